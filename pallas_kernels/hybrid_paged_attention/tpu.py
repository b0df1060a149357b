"""Hybrid paged attention for one decode step as a Pallas Mosaic TPU kernel (DESIGN.md
section 6); same contract as `reference.py`. Design, limits and verification: docs/kernels.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from pallas_kernels.hybrid_paged_attention.reference import MASK_VALUE


def _kernel(
    # scalar prefetch (SMEM)
    block_tables_ref,  # [b * max_pages]
    lengths_ref,  # [b] effective text lengths
    mem_tables_ref,  # [b * max_mem]
    mem_counts_ref,  # [b]
    # inputs
    q_ref,  # VMEM [hk, g, d]
    cos_ref,  # VMEM [max_mem, 1, d]
    sin_ref,  # VMEM [max_mem, 1, d], sign of the rotate-half folded in
    k_pages_hbm,  # HBM [n_pages, page_size, hk * d]
    v_pages_hbm,
    mem_k_hbm,  # HBM [n_mem, K, hk * d]
    mem_v_hbm,
    # output
    o_ref,  # VMEM [hk, g, d]
    # scratch
    text_k_buf,  # VMEM [2, pages_per_block, page_size, hk * d]
    text_v_buf,
    mem_k_buf,  # VMEM [2, K, hk * d]
    mem_v_buf,
    sems,  # DMA [2 (k, v), 2 (slot)]
    m_ref,  # f32 [hk, g, 1]
    l_ref,  # f32 [hk, g, 1]
    acc_ref,  # f32 [hk, g, d]
    *,
    max_pages: int,
    max_mem: int,
    scale: float,
):
    b = pl.program_id(0)
    hk, _, d = q_ref.shape
    pages_per_block, page_size = text_k_buf.shape[1], text_k_buf.shape[2]
    block_len = pages_per_block * page_size
    length = lengths_ref[b]
    n_pages = (length + page_size - 1) // page_size
    n_blocks = (n_pages + pages_per_block - 1) // pages_per_block
    n_mem = mem_counts_ref[b]
    n_steps = n_mem + n_blocks

    def mem_copies(j, slot):
        mem_id = mem_tables_ref[b * max_mem + j]
        return (
            pltpu.make_async_copy(mem_k_hbm.at[mem_id], mem_k_buf.at[slot], sems.at[0, slot]),
            pltpu.make_async_copy(mem_v_hbm.at[mem_id], mem_v_buf.at[slot], sems.at[1, slot]),
        )

    def page_copies(page, k, slot):
        page_id = block_tables_ref[b * max_pages + page]
        return (
            pltpu.make_async_copy(
                k_pages_hbm.at[page_id], text_k_buf.at[slot, k], sems.at[0, slot]
            ),
            pltpu.make_async_copy(
                v_pages_hbm.at[page_id], text_v_buf.at[slot, k], sems.at[1, slot]
            ),
        )

    def page_dma(page, k, slot, action: str):
        # Pages past the length are never fetched: their table entries may be garbage.
        @pl.when(page < n_pages)
        def _page():
            for copy in page_copies(page, k, slot):
                getattr(copy, action)()

    def dma_step(s, action: str):
        """Start or wait on every DMA of stream step `s` (a memory or a text block)."""
        slot = s % 2

        @pl.when(s < n_mem)
        def _memory():
            for copy in mem_copies(s, slot):
                getattr(copy, action)()

        @pl.when(s >= n_mem)
        def _text():
            first_page = (s - n_mem) * pages_per_block
            for k in range(pages_per_block):
                page_dma(first_page + k, k, slot, action)

    def online_update(h, q_h, k_blk, v_blk, valid_row, valid_col):
        """Fold one block of keys into the running softmax of the g query heads of KV head h."""
        scores = lax.dot_general(
            q_h, k_blk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )  # [g, n]
        if valid_row is not None:
            scores = jnp.where(valid_row, scores, MASK_VALUE)
            v_blk = jnp.where(valid_col, v_blk, 0.0)
        m_prev = m_ref[h]
        m_new = jnp.maximum(m_prev, scores.max(axis=-1, keepdims=True))
        p = jnp.exp(scores - m_new)
        if valid_row is not None:
            p = jnp.where(valid_row, p, 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_ref[h] = alpha * l_ref[h] + p.sum(axis=-1, keepdims=True)
        acc_ref[h] = alpha * acc_ref[h] + jnp.dot(p, v_blk, preferred_element_type=jnp.float32)
        m_ref[h] = m_new

    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    q = q_ref[...].astype(jnp.float32) * scale  # [hk, g, d]

    @pl.when(n_steps > 0)
    def _prologue():
        dma_step(0, "start")

    def memory_step(j, carry):
        @pl.when(j + 1 < n_steps)
        def _prefetch():
            dma_step(j + 1, "start")

        slot = j % 2
        for copy in mem_copies(j, slot):
            copy.wait()
        cos, sin = cos_ref[j], sin_ref[j]  # [1, d]
        for h in range(hk):
            q_h = q[h]
            # rotate-half as a lane roll by D/2 (direction-free: D/2 is half the axis).
            q_rot = q_h * cos + pltpu.roll(q_h, d // 2, 1) * sin  # rotated by -j*K
            k_blk = mem_k_buf[slot, :, pl.ds(h * d, d)].astype(jnp.float32)
            v_blk = mem_v_buf[slot, :, pl.ds(h * d, d)].astype(jnp.float32)
            online_update(h, q_rot, k_blk, v_blk, None, None)
        return carry

    def text_step(i, carry):
        s = n_mem + i

        @pl.when(s + 1 < n_steps)
        def _prefetch():
            dma_step(s + 1, "start")

        dma_step(s, "wait")
        slot = s % 2
        start = i * block_len
        valid_row = start + lax.broadcasted_iota(jnp.int32, (1, block_len), 1) < length
        valid_col = start + lax.broadcasted_iota(jnp.int32, (block_len, 1), 0) < length
        for h in range(hk):
            k_blk = text_k_buf[slot, :, :, pl.ds(h * d, d)].reshape(block_len, d)
            v_blk = text_v_buf[slot, :, :, pl.ds(h * d, d)].reshape(block_len, d)
            online_update(
                h,
                q[h],
                k_blk.astype(jnp.float32),
                v_blk.astype(jnp.float32),
                valid_row,
                valid_col,
            )
        return carry

    lax.fori_loop(0, n_mem, memory_step, 0)
    lax.fori_loop(0, n_blocks, text_step, 0)

    l_final = l_ref[...]
    safe_l = jnp.where(l_final > 0.0, l_final, 1.0)
    o_ref[...] = jnp.where(l_final > 0.0, acc_ref[...] / safe_l, 0.0).astype(o_ref.dtype)


def _slot_rotation_tables(
    n_slots: int, num_latents: int, inv_freq: Float[Array, " half"]
) -> tuple[Float[Array, "m 1 d"], Float[Array, "m 1 d"]]:
    """cos and signed sin of the -j*K rotation per memory slot j, rotate-half layout."""
    slot = jnp.arange(n_slots)
    angles = (-(slot * num_latents)).astype(jnp.float32)[:, None] * inv_freq.astype(jnp.float32)
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)
    sin = jnp.concatenate([-jnp.sin(angles), jnp.sin(angles)], axis=-1)
    return cos[:, None, :], sin[:, None, :]


def hybrid_paged_attention_tpu(
    q: Float[Array, "b t hq d"],
    q_text_index: Int[Array, "b t"],
    k_pages: Float[Array, "p s hk d"],
    v_pages: Float[Array, "p s hk d"],
    block_tables: Int[Array, "b np"],
    text_lengths: Int[Array, " b"],
    mem_k: Float[Array, "m k hk d"],
    mem_v: Float[Array, "m k hk d"],
    mem_tables: Int[Array, "b nm"],
    mem_counts: Int[Array, " b"],
    inv_freq: Float[Array, " half"],
    *,
    pages_per_block: int = 4,
    interpret=None,
) -> Float[Array, "b t hq d"]:
    """Decode-step hybrid paged attention as a Pallas TPU kernel; same contract as the reference.

    Args:
      pages_per_block: text pages per online-softmax step (clipped to the block-table width).
      interpret: passed to `pl.pallas_call` (e.g. `pltpu.InterpretParams()` to run on CPU); None
        compiles for TPU unless `pltpu.force_tpu_interpret_mode` is active.
    """
    batch, t, hq, d = q.shape
    if t != 1:
        raise ValueError(f"hybrid_paged_attention_tpu is decode-only: expected t == 1, got t={t}")
    n_pages_pool, page_size, hk, _ = k_pages.shape
    if hq % hk:
        raise ValueError(f"GQA: query heads ({hq}) must be a multiple of KV heads ({hk})")
    if d % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {d}")
    if pages_per_block < 1:
        raise ValueError(f"pages_per_block must be >= 1, got {pages_per_block}")
    g = hq // hk
    max_pages, n_slots = block_tables.shape[1], mem_tables.shape[1]
    n_mem_pool, num_latents = mem_k.shape[0], mem_k.shape[1]
    pages_per_block = max(1, min(pages_per_block, max_pages))

    lengths = jnp.minimum(text_lengths, q_text_index[:, 0] + 1)
    lengths = jnp.clip(lengths, 0, max_pages * page_size).astype(jnp.int32)
    counts = jnp.clip(mem_counts, 0, n_slots if n_mem_pool else 0).astype(jnp.int32)
    # Zero-width tables / empty pools: pad so that every operand is non-empty (never read).
    if max_pages == 0:
        block_tables = jnp.zeros((batch, 1), jnp.int32)
    if n_slots == 0:
        mem_tables = jnp.zeros((batch, 1), jnp.int32)
    if n_mem_pool == 0:
        mem_k = jnp.zeros((1, *mem_k.shape[1:]), mem_k.dtype)
        mem_v = jnp.zeros((1, *mem_v.shape[1:]), mem_v.dtype)
    if n_pages_pool == 0:
        k_pages = jnp.zeros((1, *k_pages.shape[1:]), k_pages.dtype)
        v_pages = jnp.zeros((1, *v_pages.shape[1:]), v_pages.dtype)
    cos, sin = _slot_rotation_tables(max(n_slots, 1), num_latents, inv_freq)

    kv_rows = hk * d  # one page row / memory row: all KV heads, contiguous
    k_flat = k_pages.reshape(k_pages.shape[0], page_size, kv_rows)
    v_flat = v_pages.reshape(v_pages.shape[0], page_size, kv_rows)
    mk_flat = mem_k.reshape(mem_k.shape[0], num_latents, kv_rows)
    mv_flat = mem_v.reshape(mem_v.shape[0], num_latents, kv_rows)
    q_hgd = q.reshape(batch, hk, g, d)

    per_seq = pl.BlockSpec((None, hk, g, d), lambda b, *_: (b, 0, 0, 0))
    table = pl.BlockSpec((cos.shape[0], 1, d), lambda b, *_: (0, 0, 0))
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    kernel = functools.partial(
        _kernel, max_pages=block_tables.shape[1], max_mem=mem_tables.shape[1], scale=d**-0.5
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(batch,),
            in_specs=[per_seq, table, table, hbm, hbm, hbm, hbm],
            out_specs=per_seq,
            scratch_shapes=[
                pltpu.VMEM((2, pages_per_block, page_size, kv_rows), k_pages.dtype),
                pltpu.VMEM((2, pages_per_block, page_size, kv_rows), v_pages.dtype),
                pltpu.VMEM((2, num_latents, kv_rows), mem_k.dtype),
                pltpu.VMEM((2, num_latents, kv_rows), mem_v.dtype),
                pltpu.SemaphoreType.DMA((2, 2)),
                pltpu.VMEM((hk, g, 1), jnp.float32),
                pltpu.VMEM((hk, g, 1), jnp.float32),
                pltpu.VMEM((hk, g, d), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((batch, hk, g, d), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret if interpret is not None else False,
        name="hybrid_paged_attention_decode",
    )(
        block_tables.reshape(-1).astype(jnp.int32),
        lengths,
        mem_tables.reshape(-1).astype(jnp.int32),
        counts,
        q_hgd,
        cos,
        sin,
        k_flat,
        v_flat,
        mk_flat,
        mv_flat,
    )
    return out.reshape(batch, 1, hq, d)
