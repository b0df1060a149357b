"""Token sampling: greedy, seeded temperature sampling, top-k, top-p; and the engine's use of it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grc_jax.infer.sampling import SamplingParams, sample

V = 64
_sample = jax.jit(sample)


def _logits(seed: int = 0, b: int = 16, scale: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(b, V)) * scale).astype(np.float32)


def _draw(logits, seed, temperature=1.0, top_k=0, top_p=1.0) -> np.ndarray:
    return np.asarray(
        _sample(
            jnp.asarray(logits),
            jax.random.key(seed),
            jnp.float32(temperature),
            jnp.int32(top_k),
            jnp.float32(top_p),
        )
    )


def _draws(logits, n, **kw) -> np.ndarray:
    """`n` seeded draws per row: [n, b]."""
    return np.stack([_draw(logits, s, **kw) for s in range(n)])


def test_greedy_is_argmax():
    lg = _logits()
    np.testing.assert_array_equal(_draw(lg, 0, temperature=0.0), lg.argmax(-1))
    # Greedy ignores the key and the filters.
    np.testing.assert_array_equal(_draw(lg, 7, temperature=0.0, top_k=3, top_p=0.5), lg.argmax(-1))


def test_temperature_sampling_is_seeded_and_varies_with_seed():
    lg = _logits(scale=0.5)
    a, b, c = _draw(lg, 1), _draw(lg, 1), _draw(lg, 2)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert (a != lg.argmax(-1)).any()  # it is actually sampling


def test_sampling_follows_the_softmax():
    lg = np.array([[2.0, 1.0, 0.0, -1.0] + [-30.0] * (V - 4)], np.float32)
    draws = _draws(np.repeat(lg, 50, 0), 40).ravel()  # 2000 draws
    freq = np.bincount(draws, minlength=V)[:4] / draws.size
    p = np.exp(lg[0, :4]) / np.exp(lg[0, :4]).sum()
    np.testing.assert_allclose(freq, p, atol=0.04)
    # A higher temperature flattens the distribution.
    hot = _draws(np.repeat(lg, 50, 0), 40, temperature=4.0).ravel()
    assert (hot == 0).mean() < freq[0] - 0.1


def test_top_k_one_is_greedy():
    lg = _logits(1, scale=0.3)
    for s in range(5):
        np.testing.assert_array_equal(_draw(lg, s, temperature=1.5, top_k=1), lg.argmax(-1))


def test_top_k_never_samples_outside_the_top_k():
    k = 5
    lg = _logits(2, scale=0.3)  # flat: without the filter most draws would fall outside
    draws = _draws(lg, 60, temperature=2.0, top_k=k)
    top = np.argsort(-lg, axis=-1)[:, :k]
    assert all(np.isin(draws[:, r], top[r]).all() for r in range(lg.shape[0]))
    assert len(np.unique(draws)) > k  # different rows, different sets: not degenerate
    assert max(len(np.unique(draws[:, r])) for r in range(lg.shape[0])) == k


def test_top_p_small_is_greedy():
    lg = _logits(3, scale=0.3)
    for s in range(5):
        np.testing.assert_array_equal(_draw(lg, s, temperature=1.0, top_p=1e-3), lg.argmax(-1))


def test_top_p_never_samples_outside_the_nucleus():
    top_p, temperature = 0.6, 1.0
    lg = _logits(4, scale=1.0)
    draws = _draws(lg, 60, temperature=temperature, top_p=top_p)
    for r in range(lg.shape[0]):
        order = np.argsort(-lg[r])
        p = np.exp(lg[r, order] / temperature)
        p /= p.sum()
        before = np.cumsum(p) - p
        nucleus = order[before < top_p]  # smallest prefix whose mass reaches top_p
        assert np.isin(draws[:, r], nucleus).all(), f"row {r} sampled outside the nucleus"
    assert len(np.unique(draws)) > 1


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.2), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
    ],
)
def test_sampling_params_reject_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_reject_nan_temperature():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("nan"))


def test_sampling_params_defaults_are_greedy():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p) == (0.0, 0, 1.0)


def test_engine_sampling_is_seeded(engine, tok):
    prompts = [[tok.bos_id, *tok.encode(q)] for q in ("hello", "why not")]
    kw = dict(max_new_tokens=8, stop_tokens=())

    def run(seed):
        sampling = SamplingParams(temperature=3.0, seed=seed)
        return [g.tokens for g in engine.generate_ids(prompts, sampling=sampling, **kw)]

    assert run(1) == run(1)
    assert any(run(s) != run(1) for s in (2, 3, 4))
    greedy = [g.tokens for g in engine.generate_ids(prompts, **kw)]
    top1 = [
        g.tokens
        for g in engine.generate_ids(
            prompts, sampling=SamplingParams(temperature=3.0, top_k=1, seed=9), **kw
        )
    ]
    assert top1 == greedy
