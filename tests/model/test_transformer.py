"""The transformer's execution options (remat, scan, dtype) and outputs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grc_jax.core.batch import Rows
from grc_jax.core.config import GRCConfig, ModelConfig
from grc_jax.core.roles import GEN, LATENT, TEXT
from grc_jax.model import abstract_params, forward, init_params, stack_layers, unstack_layers

CFG = ModelConfig(
    vocab_size=128, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=160
)
GRC = GRCConfig(num_latents=4)


def _batch(seed: int = 0) -> dict[str, jax.Array]:
    """Two packed rows: a compression block + consumer block, and two short examples."""
    rng = np.random.default_rng(seed)
    t = 16
    tokens = rng.integers(0, CFG.vocab_size, size=(2, t))
    roles = np.full((2, t), TEXT)
    roles[0, 4:8] = GEN
    roles[0, 8:12] = LATENT
    roles[0, 12:] = GEN
    tokens[0, 8:12] = np.arange(4)
    block_ids = np.zeros((2, t), int)
    block_ids[0, 12:] = 1
    segment_ids = np.ones((2, t), int)
    segment_ids[1, 9:] = 2
    segment_ids[1, 14:] = 0
    positions = np.tile(np.arange(t), (2, 1))
    positions[0, :12] = np.arange(-8, 4)
    positions[0, 12:] = np.arange(4, 8)
    positions[1, 9:] = np.arange(7)
    arrays = Rows(
        tokens=tokens,
        segment_ids=segment_ids,
        block_ids=block_ids,
        roles=roles,
        positions=positions,
    )
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.int32), arrays)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, GRC, jax.random.key(0))


def _run(cfg, params, batch, return_kv=False):
    return jax.jit(lambda p, b: forward(p, cfg, GRC, b, return_kv=return_kv))(params, batch)


def test_param_tree_shapes(params):
    shapes, logical = abstract_params(CFG, GRC)
    assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda s: s.shape, shapes)
    assert params["latents"].shape == (GRC.num_latents, CFG.d_model)
    assert params["layers_0"]["attn"]["q"]["kernel"].shape == (64, 4, 16)
    assert params["layers_0"]["attn"]["k"]["kernel"].shape == (64, 2, 16)
    assert tuple(logical["layers_0"]["attn"]["o"]["kernel"]) == ("heads", "head_dim", "embed")
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_and_scan_match_plain(params, policy, scan):
    batch = _batch()
    plain = _run(CFG, params, batch)
    cfg = dataclasses.replace(CFG, remat_policy=policy, scan_layers=scan)
    p = stack_layers(params, CFG.n_layers) if scan else params
    other = _run(cfg, p, batch)
    np.testing.assert_array_equal(np.asarray(other.logits), np.asarray(plain.logits))
    np.testing.assert_array_equal(np.asarray(other.hidden), np.asarray(plain.hidden))


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_remat_gradients_match_plain(params, scan):
    batch = _batch(1)

    def loss(cfg, p):
        return jnp.mean(forward(p, cfg, GRC, batch).logits ** 2)

    p = stack_layers(params, CFG.n_layers) if scan else params
    base = dataclasses.replace(CFG, scan_layers=scan)
    g_plain = jax.jit(jax.grad(lambda p: loss(base, p)))(p)
    remat = dataclasses.replace(base, remat_policy="full")
    g_remat = jax.jit(jax.grad(lambda p: loss(remat, p)))(p)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_stack_unstack_roundtrip(params):
    back = unstack_layers(stack_layers(params, CFG.n_layers), CFG.n_layers)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bf16_compute_close_to_fp32(params):
    batch = _batch(2)
    ref = _run(CFG, params, batch)
    low = _run(dataclasses.replace(CFG, dtype="bfloat16"), params, batch)
    assert low.hidden.dtype == jnp.bfloat16 and low.logits.dtype == jnp.float32
    valid = np.asarray(batch.segment_ids) != 0
    err = np.abs(np.asarray(low.logits) - np.asarray(ref.logits))[valid]
    assert err.max() <= 2e-2, err.max()


def test_kv_output_matches_layer_keys(params):
    """Returned keys are the rotated keys attention used: recompute layer 0's by hand."""
    from grc_jax.model.layers import RMSNorm
    from grc_jax.model.rope import apply_rope, inverse_frequencies, rope_angles

    batch = _batch(3)
    out = _run(CFG, params, batch, return_kv=True)
    k_all, v_all = out.kv
    assert k_all.shape == (CFG.n_layers, 2, 16, CFG.n_kv_heads, CFG.head_dim)
    lp = params["layers_0"]
    x = np.where(
        np.asarray(batch.roles)[..., None] == LATENT,
        np.asarray(params["latents"])[np.clip(np.asarray(batch.tokens), 0, 3)],
        np.asarray(params["embed"])[np.asarray(batch.tokens)],
    )
    h = RMSNorm(CFG.rms_norm_eps).apply({"params": lp["attn_norm"]}, jnp.asarray(x))
    k = jnp.einsum("btd,dgh->btgh", h, lp["attn"]["k"]["kernel"])
    v = jnp.einsum("btd,dgh->btgh", h, lp["attn"]["v"]["kernel"])
    cos, sin = rope_angles(batch.positions, inverse_frequencies(CFG))
    np.testing.assert_allclose(k_all[0], apply_rope(k, cos, sin), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v_all[0], v, rtol=1e-5, atol=1e-5)


def test_latent_table_feeds_latent_slots(params):
    """Changing the latent table changes latent outputs and consumers, never the text's."""
    batch = _batch(4)
    base = _run(CFG, params, batch)
    bumped = dict(params, latents=params["latents"] + 1.0)
    other = _run(CFG, bumped, batch)
    roles = np.asarray(batch.roles)
    block = np.asarray(batch.block_ids)
    text_block0 = (roles[0] != LATENT) & (block[0] == 0)
    np.testing.assert_array_equal(
        np.asarray(other.logits)[0, text_block0], np.asarray(base.logits)[0, text_block0]
    )
    diff = np.abs(np.asarray(other.logits) - np.asarray(base.logits))[0]
    assert diff[roles[0] == LATENT].min() > 0
    assert diff[block[0] == 1].min() > 0  # the consumer block reads the latents


def test_shape_annotations_are_checked_in_tests():
    """conftest installs the jaxtyping + beartype hook: a wrong shape is caught at the call."""
    from jaxtyping import TypeCheckError

    from grc_jax.model.rope import apply_rope

    with pytest.raises(TypeCheckError):
        apply_rope(jnp.ones((1, 4, 2, 8)), jnp.ones((1, 5, 8)), jnp.ones((1, 4, 8)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_head_major_attention_matches_token_major(params, dtype):
    """`model.attention_layout` changes the einsums' layout, not the math."""
    batch = _batch(4)
    base = dataclasses.replace(CFG, dtype=dtype)
    head = dataclasses.replace(base, attention_layout="head_major")
    want, got = _run(base, params, batch), _run(head, params, batch)
    tol = 1e-5 if dtype == "float32" else 2e-2
    valid = np.asarray(batch.segment_ids) != 0
    err = np.abs(np.asarray(got.logits) - np.asarray(want.logits))[valid]
    assert err.max() <= tol * np.abs(np.asarray(want.logits)).max(), err.max()
    if dtype != "float32":
        return

    def grads(cfg):
        loss = lambda p: jnp.mean(forward(p, cfg, GRC, batch).logits ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    for a, b in zip(jax.tree.leaves(grads(base)), jax.tree.leaves(grads(head)), strict=True):
        scale = float(jnp.max(jnp.abs(a))) + 1e-12
        np.testing.assert_allclose(np.asarray(b) / scale, np.asarray(a) / scale, atol=1e-5)
