"""LoRA run unmerged in the forward pass (training) against the merged kernels (inference)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grc_jax.core.config import Config, TrainConfig
from grc_jax.model import forward
from grc_jax.model.lora import lora_collection, lora_delta, merge_lora
from grc_jax.model.params import init_grc_params
from tests.model.test_transformer import CFG, GRC, _batch


def _params(model, rank=3):
    cfg = Config(model=model, grc=GRC, train=TrainConfig(lora_rank=rank))
    p = init_grc_params(cfg, jax.random.key(0))
    # b starts at zero (the base model); move both factors so the LoRA term is not zero.
    lora = jax.tree.map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), p.lora)
    return p.replace(lora=lora)


def test_lora_delta_backward_matches_autodiff():
    rng = np.random.default_rng(0)
    x, a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(37, 24), (24, 3), (3, 40)])
    dy = jnp.asarray(rng.normal(size=(37, 40)), jnp.float32)

    def plain(x, a, b):
        return (x @ a) @ b

    np.testing.assert_allclose(lora_delta(x, a, b), plain(x, a, b), rtol=1e-6)
    got = jax.vjp(lora_delta, x, a, b)[1](dy)
    want = jax.vjp(plain, x, a, b)[1](dy)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_lora_collection_nests_like_the_params():
    p = _params(CFG)
    nested = lora_collection(p.lora)
    assert set(nested["layers_0"]["attn"]) == {"q", "k", "v", "o"}
    assert set(nested["layers_2"]["mlp"]["down"]) == {"a", "b"}
    np.testing.assert_array_equal(
        nested["layers_1"]["attn"]["o"]["b"], p.lora["layers_1/attn/o/kernel"]["b"]
    )


@pytest.mark.parametrize(
    "scan,remat", [(False, "none"), (True, "none"), (False, "full"), (True, "full")]
)
def test_unmerged_forward_and_gradients_match_merged(scan, remat):
    """Same logits and LoRA gradients as a forward pass over `W + a b` (whole model: 1e-4)."""
    model = dataclasses.replace(CFG, scan_layers=scan, remat_policy=remat)
    p = _params(model)  # scanned: params and factors carry a leading layer axis
    assert ("layers" in p.model) == scan
    batch = _batch()

    def merged_logits(lora):
        return forward(merge_lora(p.model, lora, scan), model, GRC, batch).logits

    def unmerged_logits(lora):
        return forward(p.model, model, GRC, batch, lora=lora).logits

    want, got = jax.jit(merged_logits)(p.lora), jax.jit(unmerged_logits)(p.lora)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(want) / scale, atol=1e-5)

    def loss(f):
        return jax.jit(jax.grad(lambda lora: jnp.mean(f(lora) ** 2)))(p.lora)

    g_want, g_got = loss(merged_logits), loss(unmerged_logits)
    for key in g_want:
        for f in ("a", "b"):
            w, g = np.asarray(g_want[key][f]), np.asarray(g_got[key][f])
            s = np.abs(w).max()
            np.testing.assert_allclose(g / s, w / s, atol=1e-4, err_msg=f"{key}/{f}")


def test_no_lora_collection_is_the_plain_model():
    p = _params(CFG)
    batch = _batch(1)
    plain = forward(p.model, CFG, GRC, batch).logits
    np.testing.assert_array_equal(forward(p.model, CFG, GRC, batch, lora=None).logits, plain)
