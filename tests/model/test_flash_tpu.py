"""The Pallas TPU GRC flash attention kernels (`grc_jax/model/flash_tpu.py`) in the TPU
interpreter on CPU: outputs and dq / dk / dv equal the dense reference on random packed GRC
layouts; the per-row tile map and the fetch index; the kernel inside the model
(`attention_impl="kernel"` under `interpret_kernel`) and the logged fallback off TPU."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh

from grc_jax.core.config import GRCConfig
from grc_jax.core.sharding import MESH_AXES, activation_sharding
from grc_jax.model import flash_tpu, forward, init_params
from grc_jax.model.flash import flash_attention, flash_layout
from grc_jax.model.flash_tpu import (
    fetch_index,
    flash_attention_tpu,
    interpret_kernel,
    kernel_attention,
    row_tiles,
)
from grc_jax.model.layers import dot_product_attention
from grc_jax.model.mask import TokenMeta, grc_mask
from tests.model.test_flash import CFG, MODES, _model_batch, _outputs_and_grads, _qkv, _random_rows

# Scratch starts as NaN: a kernel that read its accumulators before initialising them would show.
INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan")
# (rtol, atol). fp32: elementwise 1e-5. bf16: 2e-2 of each tensor's largest magnitude, against the
# float32 reference: a sum of bf16-rounded terms of size ~4 is off by about one bf16 ulp (1.6e-2)
# even where its value is small, so an elementwise 2e-2 fails the bf16 dense path too (at equal
# blocks the kernel equals the chunked implementation bit for bit; docs/kernels.md).
TOLERANCE = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (0.0, 2e-2)}


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    mode: str
    seed: int
    seq_len: int = 48
    chunk: int = 16  # the layout's chunk (the kernel pads further to a multiple of its blocks)
    block_q: int = 16
    block_k: int = 16
    h: int = 6
    g: int = 2
    d: int = 8
    dtype: type = jnp.float32


CASES = [
    Case("independent_gqa3", "independent", seed=1),
    # Blocks of different sizes that do not divide the row: padded to lcm(16, 32) = 64.
    Case("recurrent_gqa3_uneven_blocks", "recurrent", seed=2, chunk=20, block_k=32),
    Case("independent_mha_d16", "independent", seed=3, block_q=32, h=2, g=2, d=16),
    Case("recurrent_mqa_bf16", "recurrent", seed=4, block_q=32, h=4, g=1, d=16, dtype=jnp.bfloat16),
]
# Interpreted cases take 10-30 s each; `make test` runs the GQA recurrent case with uneven blocks,
# `make test-all` all of them (the model and mesh tests below run independent mode in make test).
SLOW_CASES = {"independent_gqa3", "independent_mha_d16", "recurrent_mqa_bf16"}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.name, marks=[pytest.mark.slow] * (c.name in SLOW_CASES)) for c in CASES],
)
def test_kernel_equals_dense_outputs_and_gradients(case: Case):
    seg, blk, role = _random_rows(case.seed, case.mode, seq_len=case.seq_len)
    b, t = seg.shape
    pad = np.asarray(seg == 0)
    assert b > 1 and pad.any()  # several packed rows, with padding
    q, k, v = _qkv(b, t, h=case.h, g=case.g, d=case.d, dtype=case.dtype, seed=case.seed)
    cot = jax.random.normal(jax.random.key(case.seed + 7), q.shape)
    mask = grc_mask(seg, blk, role, case.mode)
    layout = flash_layout(TokenMeta.build(seg, blk, role, case.mode), case.chunk)
    # bf16: against the float32 reference on the same (bf16) inputs; see TOLERANCE.
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = _outputs_and_grads(
        lambda *a: dot_product_attention(*a, mask), f32(q), f32(k), f32(v), cot
    )

    def kernel(q, k, v):
        return flash_attention_tpu(
            q, k, v, layout, block_q=case.block_q, block_k=case.block_k, interpret=INTERPRET
        )

    got = _outputs_and_grads(jax.jit(kernel), q, k, v, cot)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == case.dtype, name
        g32, w32 = np.asarray(g, np.float32), np.asarray(w)
        assert np.isfinite(g32).all(), name
        rtol, atol = TOLERANCE[case.dtype]
        if case.dtype == jnp.bfloat16:
            atol *= float(np.abs(w32).max())
        np.testing.assert_allclose(g32, w32, rtol=rtol, atol=atol, err_msg=name)
    # A query that sees no key (padding) gets exactly 0, and so does its gradient; a key seen by
    # no query (padding) gets zero gradients.
    out, dq, dk, dv = (np.asarray(x, np.float32) for x in got)
    assert np.all(out[pad] == 0) and np.all(dq[pad] == 0)
    assert np.all(dk[pad] == 0) and np.all(dv[pad] == 0)


@pytest.mark.parametrize("mode", MODES)
def test_row_tiles_keep_every_visible_pair_and_skip_more_than_the_batch_map(mode):
    skipped = batch_skipped = 0
    for seed in range(8):
        seg, blk, role = _random_rows(200 + seed, mode, seq_len=64, n_examples=10)
        b, t = seg.shape
        mask = np.asarray(grc_mask(seg, blk, role, mode))
        meta = TokenMeta.build(seg, blk, role, mode)
        for bq, bk in ((8, 8), (8, 16), (16, 8)):
            tiles = np.asarray(row_tiles(meta, bq, bk))
            has = mask.reshape(b, t // bq, bq, t // bk, bk).any(axis=(2, 4))
            assert not np.any(has & ~tiles), f"seed {seed} blocks {bq}x{bk}: a visible tile lost"
        tiles = np.asarray(row_tiles(meta, 8, 8))
        causal = np.tril(np.ones(tiles.shape[1:], bool))
        skipped += int((causal & ~tiles).sum())
        batch_skipped += b * int((causal & ~tiles.any(axis=0)).sum())
    # Per row, more tiles are proven empty than by one map shared by the whole batch.
    assert skipped > batch_skipped > 0, (skipped, batch_skipped)


def test_fetch_index_holds_the_next_computed_block_else_the_last():
    tiles = np.array(
        [
            [0, 1, 0, 0, 1, 0],  # before, between and after computed blocks
            [0, 0, 0, 0, 0, 0],  # nothing computed: hold block 0
            [1, 1, 1, 1, 1, 1],
        ],
        bool,
    )[None]
    want = np.array([[1, 1, 4, 4, 4, 4], [0, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 5]])[None]
    np.testing.assert_array_equal(fetch_index(jnp.asarray(tiles)), want)


# ---------------------------------------------------------------------------------------------
# In the model: `attention_impl="kernel"`.


def _model_loss(params, cfg, grc, rows):
    real = rows.segment_ids != 0
    out = forward(params, cfg, grc, rows)
    return jnp.sum(jnp.where(real[..., None], out.logits, 0.0) ** 2) * 1e-3, out.logits


@pytest.mark.slow  # about 40 s in the interpreter
def test_model_with_the_kernel_in_the_interpreter_matches_dense():
    mode = "independent"
    grc = GRCConfig(num_latents=3, memory_mode=mode)
    # Two tiles a row side (t = 40 padded to 48), three rows: enough to exercise the wiring (the
    # tests above cover the kernel itself), small enough for the interpreter.
    kernel_cfg = dataclasses.replace(CFG, attention_impl="kernel", attention_chunk=24)
    params = init_params(CFG, grc, jax.random.key(2))
    rows = jax.tree.map(lambda a: a[:3], _model_batch(mode, seed=11))
    grad = jax.value_and_grad(_model_loss, has_aux=True)
    (l_d, logits_d), g_d = grad(params, CFG, grc, rows)
    with interpret_kernel(INTERPRET):
        (l_k, logits_k), g_k = jax.jit(grad, static_argnums=(1, 2))(params, kernel_cfg, grc, rows)
    np.testing.assert_allclose(logits_k, logits_d, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(l_k, l_d, rtol=1e-4)
    for (path, gk), gd in zip(
        jax.tree_util.tree_leaves_with_path(g_k), jax.tree_util.tree_leaves(g_d)
    ):
        np.testing.assert_allclose(gk, gd, rtol=1e-4, atol=1e-4, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # about 35 s in the interpreter
def test_kernel_attention_on_a_mesh_runs_per_device_and_matches_dense(devices):
    # Rows over `data`, heads over `tensor` (2 query heads and their KV head per device).
    mesh = Mesh(np.array(devices[:4]).reshape(2, 1, 2), MESH_AXES)
    seg, blk, role = (a[:4] for a in _random_rows(5, "independent"))
    q, k, v = _qkv(*seg.shape, h=4, g=2, seed=5)
    cot = jax.random.normal(jax.random.key(12), q.shape)
    mask = grc_mask(seg, blk, role, "independent")
    want = _outputs_and_grads(lambda *a: dot_product_attention(*a, mask), q, k, v, cot)
    layout = flash_layout(TokenMeta.build(seg, blk, role, "independent"), 16)
    with activation_sharding(mesh), interpret_kernel(INTERPRET):
        attend = jax.jit(lambda *a: kernel_attention(*a, layout))
        assert "shard_map" in str(jax.make_jaxpr(attend)(q, k, v))
        got = _outputs_and_grads(attend, q, k, v, cot)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_kernel_impl_off_tpu_uses_chunked_and_logs_once(caplog, monkeypatch, devices):
    assert jax.default_backend() != "tpu"
    # The kernel must not be called off TPU: make it fail loudly if it were.
    monkeypatch.setattr(flash_tpu, "flash_attention_tpu", lambda *a, **k: pytest.fail("kernel"))
    flash_tpu._log_fallback.cache_clear()
    seg, blk, role = _random_rows(9, "independent")
    q, k, v = _qkv(*seg.shape, seed=9)
    layout = flash_layout(TokenMeta.build(seg, blk, role, "independent"), 16)
    with caplog.at_level(logging.WARNING, logger=flash_tpu.__name__):
        got = [kernel_attention(q, k, v, layout) for _ in range(2)]
        with activation_sharding(Mesh(np.array(devices[:2]).reshape(2, 1, 1), MESH_AXES)):
            got.append(kernel_attention(q, k, v, layout))  # a CPU mesh: chunked too
    for x in got:
        np.testing.assert_array_equal(x, flash_attention(q, k, v, layout))
    lines = [r for r in caplog.records if r.name == flash_tpu.__name__]
    assert len(lines) == 1 and "TPU-only" in lines[0].getMessage()
