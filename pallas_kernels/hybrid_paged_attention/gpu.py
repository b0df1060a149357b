"""Hybrid paged attention for one decode step as a Pallas Mosaic GPU kernel (DESIGN.md
section 6); same contract as `reference.py`. Design, limits and verification: docs/kernels.md.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float, Int

from pallas_kernels.hybrid_paged_attention.reference import MASK_VALUE, rotate_half

_ROW_TILE = 64  # rows per WGMMA-layout register tile
_DEFAULT_SM_COUNT = 132  # H100 SXM, when the device does not say
_SMEM_BUDGET = 200 * 1024
_FULL = plgpu.Layout.WGMMA  # [rows, D] tile
_PER_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per key row
_PER_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per head-dim column


def _interpret_params():
    """The Mosaic GPU interpreter's parameters (private in JAX 0.10; public name if exported)."""
    params = getattr(plgpu, "InterpretParams", None)
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()


def _sm_count() -> int:
    return getattr(jax.devices()[0], "core_count", None) or _DEFAULT_SM_COUNT


def _pick_num_splits(programs: int, max_tiles: int) -> int:
    """Splits per (sequence, KV head) so that about one program per SM runs."""
    target = _sm_count()
    if programs >= target:
        return 1
    return max(1, min(-(-target // programs), max_tiles))


def _swizzle(d: int, itemsize: int) -> int:
    row_bytes = d * itemsize
    for swizzle in (128, 64, 32):
        if row_bytes % swizzle == 0:
            return swizzle
    raise ValueError(f"head_dim * itemsize: expected a multiple of 32 bytes, got {row_bytes}")


def _kernel(
    len_ref, nmem_ref, bt_ref, mt_ref, q_ref, trig_ref, kp_ref, vp_ref, mk_ref, mv_ref,
    acc_out, stat_out,
    kbuf, vbuf, qbuf, trigbuf, accbuf, statbuf, q_bar, mk_bar, mv_bar, tk_bar, tv_bar, free_bar,
    *, g, d, rows, page_size, pages_per_block, num_latents, num_splits, has_memory, interpret,
):  # fmt: skip
    """One program: query heads of KV head `h` of sequence `b` over tiles of split `s`.

    Ring protocol, per slot: `free_bar` completes a phase when the warpgroup has finished reading
    the slot (every thread arrives after its last K/V load of the tile); a refill waits on it
    before issuing the TMA, so a slot is never overwritten while a thread may still read it.
    Both slots start free (one arrival each), and the last phase of each is awaited at the end,
    so waits and arrivals alternate and every barrier ends balanced.
    """
    f32 = jnp.float32

    def layout(x, lay):
        return x if interpret else plgpu.layout_cast(x, lay)

    def iota(shape, dim, lay):
        if interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=lay)

    b, h, s = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("s")
    tile_tokens = page_size * pages_per_block
    length = len_ref[b]
    n_mem = nmem_ref[b]
    n_tiles = n_mem + (length + tile_tokens - 1) // tile_tokens
    chunk = (n_tiles + num_splits - 1) // num_splits
    lo = jnp.minimum(s * chunk, n_tiles)
    hi = jnp.minimum(lo + chunk, n_tiles)

    plgpu.copy_gmem_to_smem(q_ref.at[b, h], qbuf, q_bar)
    for slot in range(2):
        plgpu.barrier_arrive(free_bar.at[slot])  # both ring slots start free
    plgpu.barrier_wait(q_bar)
    for i in range(g):
        accbuf[i] = layout(jnp.zeros((d,), f32), _PER_COL)

    def attend(slot, n_valid, make_query, k_bar, v_bar, carry):
        """Online-softmax update of every query head with the tile in ring slot `slot`."""
        ms, ls = carry
        plgpu.barrier_wait(k_bar.at[slot])
        query = make_query()
        k = layout(kbuf.at[slot][...], _FULL).astype(f32)
        row_ok = iota((rows,), 0, _PER_ROW) < n_valid
        probs, alphas, new_ms, new_ls = [], [], [], []
        for i in range(g):
            q_i = lax.broadcast_in_dim(query(i), (rows, d), (1,))
            scores = jnp.where(row_ok, jnp.sum(k * q_i, axis=1), MASK_VALUE)
            m_new = jnp.maximum(ms[i], jnp.max(scores))
            alpha = jnp.exp2(ms[i] - m_new)
            p = jnp.exp2(scores - m_new)
            probs.append(p)
            alphas.append(alpha)
            new_ms.append(m_new)
            new_ls.append(ls[i] * alpha + jnp.sum(p))
        plgpu.barrier_wait(v_bar.at[slot])
        v = layout(vbuf.at[slot][...], _FULL).astype(f32)
        plgpu.barrier_arrive(free_bar.at[slot])  # this thread's last read of the slot
        v = jnp.where(iota((rows, d), 0, _FULL) < n_valid, v, 0.0)
        for i in range(g):
            pv = jnp.sum(lax.broadcast_in_dim(probs[i], (rows, d), (0,)) * v, axis=0)
            accbuf[i] = layout(accbuf[i], _PER_COL) * alphas[i] + pv
        return tuple(new_ms), tuple(new_ls)

    def refill(fetch, t, slot):
        """Fetch tile `t` into `slot` once the slot's previous tile has been read by all."""
        plgpu.barrier_wait(free_bar.at[slot])
        fetch(t, slot)

    def stream(first, last, fetch, consume, carry):
        """Tiles `[first, last)` through the two-slot ring: fetch tile t+1 while using tile t."""

        @pl.when(first < last)
        def _():
            refill(fetch, first, 0)

        def step(t, carry):
            slot = (t - first) % 2

            @pl.when(t + 1 < last)
            def _():
                refill(fetch, t + 1, 1 - slot)

            return consume(t, slot, carry)

        return lax.fori_loop(first, last, step, carry)

    carry = (
        tuple(jnp.full((), MASK_VALUE, f32) for _ in range(g)),
        tuple(jnp.zeros((), f32) for _ in range(g)),
    )

    if has_memory:
        n_pool = mk_ref.shape[0]

        def fetch_memory(j, slot):
            mem = jnp.clip(mt_ref[b, j], 0, n_pool - 1)
            dst = pl.ds(0, num_latents)
            plgpu.copy_gmem_to_smem(mk_ref.at[mem, :, h, :], kbuf.at[slot, dst], mk_bar.at[slot])
            plgpu.copy_gmem_to_smem(trig_ref.at[j], trigbuf.at[slot], mk_bar.at[slot])
            plgpu.copy_gmem_to_smem(mv_ref.at[mem, :, h, :], vbuf.at[slot, dst], mv_bar.at[slot])

        def consume_memory(j, slot, carry):
            def make_query():  # called after the wait on mk_bar, which also covers the cos/sin
                cos = layout(trigbuf[slot, 0], _PER_COL)
                sin = layout(trigbuf[slot, 1], _PER_COL)
                return lambda i: (
                    layout(qbuf[0, i], _PER_COL) * cos + layout(qbuf[1, i], _PER_COL) * sin
                )

            return attend(slot, num_latents, make_query, mk_bar, mv_bar, carry)

        carry = stream(lo, jnp.minimum(hi, n_mem), fetch_memory, consume_memory, carry)

    n_pool_pages = kp_ref.shape[0]
    last_page = (length + page_size - 1) // page_size - 1

    def fetch_text(t, slot):
        for j in range(pages_per_block):
            page_slot = jnp.minimum(t * pages_per_block + j, last_page)
            page = jnp.clip(bt_ref[b, page_slot], 0, n_pool_pages - 1)
            dst = pl.ds(j * page_size, page_size)
            plgpu.copy_gmem_to_smem(kp_ref.at[page, :, h, :], kbuf.at[slot, dst], tk_bar.at[slot])
            plgpu.copy_gmem_to_smem(vp_ref.at[page, :, h, :], vbuf.at[slot, dst], tv_bar.at[slot])

    def consume_text(t, slot, carry):
        def make_query():
            return lambda i: layout(qbuf[0, i], _PER_COL)

        n_valid = jnp.minimum(length - t * tile_tokens, tile_tokens)
        return attend(slot, n_valid, make_query, tk_bar, tv_bar, carry)

    text_lo = jnp.maximum(lo, n_mem) - n_mem
    text_hi = jnp.maximum(hi, n_mem) - n_mem
    ms, ls = stream(text_lo, text_hi, fetch_text, consume_text, carry)

    for slot in range(2):
        plgpu.barrier_wait(free_bar.at[slot])  # the slot's last release: balanced barriers
    for i in range(g):
        statbuf[0, i] = ms[i]
        statbuf[1, i] = ls[i]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(accbuf, acc_out.at[b, h, s])
    plgpu.copy_smem_to_gmem(statbuf, stat_out.at[b, h, s])
    plgpu.wait_smem_to_gmem(0)


def hybrid_paged_attention_gpu(
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
    num_splits: int | None = None,
    interpret: bool = False,
) -> Float[Array, "b t hq d"]:
    """Decode-step hybrid paged attention on a GPU; same contract as the reference."""
    batch, t, hq, d = q.shape
    _, page_size, hk, _ = k_pages.shape
    n_pool, num_latents = mem_k.shape[:2]
    max_pages, max_mem = block_tables.shape[1], mem_tables.shape[1]
    if t != 1:
        raise ValueError(f"hybrid_paged_attention_gpu: decode only, expected t == 1, got t={t}")
    if hq % hk:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hk})")
    if not (k_pages.dtype == v_pages.dtype == mem_k.dtype == mem_v.dtype):
        raise ValueError(
            "k_pages, v_pages, mem_k, mem_v: expected one dtype, got "
            f"{k_pages.dtype}, {v_pages.dtype}, {mem_k.dtype}, {mem_v.dtype}"
        )
    has_memory = max_mem > 0 and n_pool > 0 and num_latents > 0
    if page_size % 8 or (has_memory and num_latents % 8):
        raise ValueError(
            f"page_size ({page_size}) and latents per memory ({num_latents}): "
            "expected multiples of 8"
        )
    if pages_per_block < 1:
        raise ValueError(f"pages_per_block: expected >= 1, got {pages_per_block}")
    kv_dtype = k_pages.dtype
    swizzle = _swizzle(d, kv_dtype.itemsize)
    g = hq // hk
    rows = max(pages_per_block * page_size, num_latents if has_memory else 0)
    rows = -(-rows // _ROW_TILE) * _ROW_TILE
    smem = 4 * rows * d * kv_dtype.itemsize
    if smem > _SMEM_BUDGET:
        raise ValueError(
            f"K/V ring of {smem} bytes exceeds {_SMEM_BUDGET}: lower pages_per_block "
            f"({pages_per_block}) for page_size {page_size}, head_dim {d}, {kv_dtype}"
        )
    max_tiles = (max_mem if has_memory else 0) + -(-max_pages // pages_per_block)
    if num_splits is None:
        num_splits = _pick_num_splits(batch * hk, max_tiles)
    if num_splits < 1:
        raise ValueError(f"num_splits: expected >= 1, got {num_splits}")

    f32 = jnp.float32
    length = jnp.minimum(text_lengths, q_text_index[:, 0] + 1)
    length = jnp.clip(length, 0, max_pages * page_size).astype(jnp.int32)
    n_mem = jnp.clip(mem_counts, 0, max_mem if has_memory else 0).astype(jnp.int32)
    scale = d**-0.5 * math.log2(math.e)  # scores in base 2, see exp2 in the kernel
    q_bhgd = q[:, 0].astype(f32).reshape(batch, hk, g, d) * scale
    q_pair = jnp.stack([q_bhgd, rotate_half(q_bhgd)], axis=2)  # [b, hk, 2, g, d]
    n_slots = max(max_mem, 1)
    angles = (-(jnp.arange(n_slots) * num_latents)).astype(f32)[:, None] * inv_freq.astype(f32)
    trig = jnp.stack(
        [jnp.concatenate([jnp.cos(angles)] * 2, -1), jnp.concatenate([jnp.sin(angles)] * 2, -1)],
        axis=1,
    )  # [n_slots, 2, d]: rotate(x, a) = x * cos + rotate_half(x) * sin
    if not has_memory:
        mem_k = mem_v = jnp.zeros((1, 8, hk, d), kv_dtype)
        mem_tables = jnp.zeros((batch, 1), jnp.int32)
        num_latents = 8
    stat_width = -(-g // 32) * 32

    tiled = (
        plgpu.TilingTransform((8, swizzle // kv_dtype.itemsize)),
        plgpu.SwizzleTransform(swizzle),
    )
    kernel = functools.partial(
        _kernel, g=g, d=d, rows=rows, page_size=page_size, pages_per_block=pages_per_block,
        num_latents=num_latents, num_splits=num_splits, has_memory=has_memory,
        interpret=interpret,
    )  # fmt: skip
    call = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((batch, hk, num_splits, g, d), f32),
            jax.ShapeDtypeStruct((batch, hk, num_splits, 2, stat_width), f32),
        ),
        scratch_types=[
            plgpu.SMEM((2, rows, d), kv_dtype, transforms=tiled),
            plgpu.SMEM((2, rows, d), kv_dtype, transforms=tiled),
            plgpu.SMEM((2, g, d), f32),
            plgpu.SMEM((2, 2, d), f32),
            plgpu.SMEM((g, d), f32),
            plgpu.SMEM((2, stat_width), f32),
            plgpu.Barrier(num_arrivals=1),
            plgpu.Barrier(num_arrivals=2, num_barriers=2),
            plgpu.Barrier(num_arrivals=1, num_barriers=2),
            plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=2),
            plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=2),
            plgpu.Barrier(num_arrivals=1, num_barriers=2),  # free_bar: slot read by all
        ],
        grid=(batch, hk, num_splits),
        grid_names=("b", "h", "s"),
        compiler_params=plgpu.CompilerParams(reduction_scratch_bytes=6144),
        interpret=_interpret_params() if interpret else None,
    )
    acc, stats = call(
        length, n_mem, block_tables.astype(jnp.int32), mem_tables.astype(jnp.int32), q_pair, trig,
        k_pages, v_pages, mem_k, mem_v,
    )  # fmt: skip
    return _combine(acc, stats[..., 0, :g], stats[..., 1, :g]).reshape(q.shape).astype(q.dtype)


def _combine(acc, run_max, run_sum):
    """Merge split partials `[b, hk, S, g, (d)]` (base-2 running max and sum) into the output."""
    w = jnp.exp2(run_max - jnp.max(run_max, axis=2, keepdims=True))
    total = jnp.sum(w * run_sum, axis=2)  # an empty split has max MASK_VALUE, sum 0 and acc 0
    out = jnp.sum(w[..., None] * acc, axis=2)
    return jnp.where(total[..., None] > 0, out / jnp.where(total > 0, total, 1.0)[..., None], 0.0)
