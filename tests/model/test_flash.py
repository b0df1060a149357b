"""GRC flash attention (`grc_jax/model/flash.py`) equals the dense reference: outputs and
gradients on random packed GRC layouts, tile skipping that never drops a visible pair, the O(t)
compression-block flags, and whole models with `attention_impl="chunked"`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grc_jax.core.batch import Rows
from grc_jax.core.config import GRCConfig, ModelConfig
from grc_jax.core.roles import LATENT
from grc_jax.data.layout import gen, latents, pack_examples, text
from grc_jax.model import forward, init_params
from grc_jax.model.flash import flash_attention, flash_layout
from grc_jax.model.layers import dot_product_attention
from grc_jax.model.mask import TokenMeta, compression_block_flags, grc_mask

MODES = ("independent", "recurrent")


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _random_example(rng, k):
    """1-4 blocks of text / gen spans, most ending in K latents (compression blocks)."""
    blocks = []
    for _ in range(rng.integers(1, 5)):
        spans = [
            (text if rng.random() < 0.5 else gen)(rng.integers(1, 50, rng.integers(1, 9)))
            for _ in range(rng.integers(1, 3))
        ]
        if rng.random() < 0.6:
            spans.append(latents(k))
        blocks.append(spans)
    return blocks


def _random_rows(seed, mode, seq_len=48, n_examples=8, k=3):
    """Packed rows (several examples a row, padding at row ends) as jnp int32 metadata."""
    rng = np.random.default_rng(seed)
    rows = pack_examples([_random_example(rng, k) for _ in range(n_examples)], seq_len, k, mode)
    return tuple(jnp.asarray(a, jnp.int32) for a in (rows.segment_ids, rows.block_ids, rows.roles))


def _qkv(b, t, h=6, g=2, d=8, dtype=jnp.float32, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (b, t, h, d), dtype),
        jax.random.normal(kk, (b, t, g, d), dtype),
        jax.random.normal(kv, (b, t, g, d), dtype),
    )


def _outputs_and_grads(attend, q, k, v, cotangent):
    out, vjp = jax.vjp(attend, q, k, v)
    return (out, *vjp(cotangent.astype(out.dtype)))


# `make test` runs one chunk size per mode (20 does not divide t: padded tiles); make test-all all.
FAST_CHUNKS = {("independent", 20), ("recurrent", 16)}


@pytest.mark.parametrize(
    "mode,chunk",
    [
        pytest.param(m, c, marks=[pytest.mark.slow] * ((m, c) not in FAST_CHUNKS))
        for m in MODES
        for c in (8, 16, 20, 64)
    ],
)
def test_chunked_equals_dense_outputs_and_gradients(mode, chunk):
    seg, blk, role = _random_rows(chunk, mode)
    b, t = seg.shape
    assert b > 1 and bool(jnp.any(seg == 0))  # several packed rows, with padding
    q, k, v = _qkv(b, t, seed=chunk)
    mask = grc_mask(seg, blk, role, mode)
    layout = flash_layout(TokenMeta.build(seg, blk, role, mode), chunk)
    cot = jax.random.normal(jax.random.key(7), q.shape)
    want = _outputs_and_grads(lambda *a: dot_product_attention(*a, mask), q, k, v, cot)
    got = _outputs_and_grads(jax.jit(lambda *a: flash_attention(*a, layout)), q, k, v, cot)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_chunked_bf16_within_bf16_tolerance():
    seg, blk, role = _random_rows(3, "independent")
    q, k, v = _qkv(*seg.shape, dtype=jnp.bfloat16, seed=3)
    mask = grc_mask(seg, blk, role, "independent")
    layout = flash_layout(TokenMeta.build(seg, blk, role, "independent"), 16)
    cot = jax.random.normal(jax.random.key(1), q.shape)
    want = _outputs_and_grads(lambda *a: dot_product_attention(*a, mask), q, k, v, cot)
    got = _outputs_and_grads(lambda *a: flash_attention(*a, layout), q, k, v, cot)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=2e-2, atol=2e-2,
            err_msg=name,
        )  # fmt: skip


def test_query_with_no_visible_key_gets_zero_in_both():
    seg, blk, role = _random_rows(5, "independent")
    pad = np.asarray(seg == 0)
    assert pad.any()
    q, k, v = _qkv(*seg.shape, seed=5)
    mask = grc_mask(seg, blk, role, "independent")
    dense = np.asarray(dot_product_attention(q, k, v, mask))
    layout = flash_layout(TokenMeta.build(seg, blk, role, "independent"), 16)
    flash = np.asarray(flash_attention(q, k, v, layout))
    assert np.all(dense[pad] == 0) and np.all(flash[pad] == 0)
    assert np.all(np.any(dense[~pad] != 0, axis=(-1, -2)))


@pytest.mark.parametrize("mode", MODES)
def test_tile_map_keeps_every_visible_pair_and_skips_some(mode):
    skipped = total = 0
    for seed in range(6):
        seg, blk, role = _random_rows(100 + seed, mode, seq_len=64, n_examples=10)
        mask = np.asarray(grc_mask(seg, blk, role, mode))
        for chunk in (8, 16):
            layout = flash_layout(TokenMeta.build(seg, blk, role, mode), chunk)
            tiles = np.asarray(layout.tiles)
            n = tiles.shape[0]
            padded = np.zeros((mask.shape[0], n * chunk, n * chunk), bool)
            padded[:, : mask.shape[1], : mask.shape[2]] = mask
            has = padded.reshape(-1, n, chunk, n, chunk).any(axis=(0, 2, 4))
            assert not np.any(has & ~tiles), f"seed {seed} chunk {chunk}: a visible tile skipped"
            causal = np.tril(np.ones((n, n), bool))
            skipped += int((causal & ~tiles).sum())
            total += int(causal.sum())
    # Packed rows of short examples: many tiles below the diagonal share no example.
    assert skipped > 0.1 * total, (skipped, total)


def _dense_flags(seg, blk, role):
    same = (seg[:, :, None] == seg[:, None, :]) & (blk[:, :, None] == blk[:, None, :])
    return np.any(same & (role[:, None, :] == LATENT), axis=-1)


def test_compression_block_flags_without_a_square_matrix():
    rng = np.random.default_rng(0)
    for t in (1, 7, 23, 40, 40, 40):  # few distinct shapes: each one compiles
        b = 3
        # Non-contiguous blocks and segments too: the rule is per (segment, block) pair.
        seg = rng.integers(0, 4, (b, t))
        blk = rng.integers(0, 3, (b, t))
        role = rng.integers(0, 4, (b, t))
        got = compression_block_flags(*(jnp.asarray(a, jnp.int32) for a in (seg, blk, role)))
        np.testing.assert_array_equal(got, _dense_flags(seg, blk, role))


# ---------------------------------------------------------------------------------------------
# Whole models: the chunked implementation in the real transformer, with scan / remat / bf16.

CFG = ModelConfig(
    vocab_size=96, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8, d_ff=96
)


def _model_batch(mode, seed=0) -> Rows:
    seg, blk, role = _random_rows(seed, mode, seq_len=40)
    rng = np.random.default_rng(seed)
    tokens = np.where(role == LATENT, 0, rng.integers(0, CFG.vocab_size, seg.shape))
    positions = rng.integers(-8, 40, seg.shape)
    return Rows(
        tokens=jnp.asarray(tokens, jnp.int32), segment_ids=seg, block_ids=blk, roles=role,
        positions=jnp.asarray(positions, jnp.int32),
    )  # fmt: skip


@pytest.mark.parametrize(
    "mode,options",
    [
        pytest.param("independent", {}, marks=pytest.mark.slow),
        ("recurrent", {}),
        ("independent", {"scan_layers": True, "remat_policy": "full"}),
    ],
)
def test_model_logits_and_gradients_match_dense(mode, options):
    grc = GRCConfig(num_latents=3, memory_mode=mode)
    dense_cfg = dataclasses.replace(CFG, **options)
    flash_cfg = dataclasses.replace(dense_cfg, attention_impl="chunked", attention_chunk=16)
    params = init_params(dense_cfg, grc, jax.random.key(1))
    rows = _model_batch(mode, seed=11)
    real = np.asarray(rows.segment_ids != 0)

    def loss(p, cfg):
        out = forward(p, cfg, grc, rows)
        return jnp.sum(jnp.where(real[..., None], out.logits, 0.0) ** 2) * 1e-3, out.logits

    (l_d, logits_d), g_d = jax.value_and_grad(loss, has_aux=True)(params, dense_cfg)
    (l_f, logits_f), g_f = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
        params, flash_cfg
    )
    np.testing.assert_allclose(logits_f, logits_d, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(l_f, l_d, rtol=1e-4)
    for (path, gf), gd in zip(
        jax.tree_util.tree_leaves_with_path(g_f), jax.tree_util.tree_leaves(g_d)
    ):
        np.testing.assert_allclose(gf, gd, rtol=1e-4, atol=1e-4, err_msg=jax.tree_util.keystr(path))
