"""GRC flash attention for the training pass as Pallas TPU (Mosaic) kernels: forward, dq, dk/dv.

Same contract as `grc_jax.model.flash.flash_attention` (the pure-JAX chunked version, which is the
fallback off TPU): GRC visibility evaluated per tile from per-token metadata by
`grc_jax.model.mask.visible`, tiles proven empty skipped, online softmax, a custom VJP whose
backward recomputes the probabilities from the saved log-sum-exp. Queries that see no key get 0
and zero gradients. Design, limits and verification status: docs/kernels.md.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from grc_jax.core.constants import MASK_VALUE
from grc_jax.core.sharding import current_mesh, logical_to_spec
from grc_jax.model.flash import FlashLayout, flash_attention
from grc_jax.model.mask import TokenMeta, tile_visibility, visible

_log = logging.getLogger(__name__)

LANES, SUBLANES = 128, 8
# Metadata fields, in this order: lane f of `rows`, sublane f of `cols` (`_Maps`).
_FIELDS = ("segment_ids", "block_ids", "roles", "in_compression_block")
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


class _Static(NamedTuple):
    """Compile-time settings of one call (hashable: a `custom_vjp` non-differentiable argument)."""

    block_q: int
    block_k: int
    memory_mode: str
    interpret: Any


class _Maps(NamedTuple):
    """Integer inputs of the kernels, built once per call from the layout (no gradients).

    `tiles[b, i, j]` (flattened): may tile (query block i, key block j) of row b hold a visible
    pair; `k_fetch` the key block to hold in VMEM at that step (j where the tile is computed, a
    neighbouring computed block where it is skipped, so the pipeline does not fetch a block no
    one reads). `tiles_t` / `q_fetch` are the same for the dk/dv kernel's (key, query) order.
    `rows` is the metadata with tokens along sublanes (`[b, t, 128]`, field f in lane f), `cols`
    with tokens along lanes (`[b, 8, t]`, field f in sublane f): one (8, 128)-tiled array each,
    so a block of either is a whole number of tiles.
    """

    tiles: Int[Array, " n"]
    k_fetch: Int[Array, " n"]
    tiles_t: Int[Array, " n"]
    q_fetch: Int[Array, " n"]
    rows: Int[Array, "b t lanes"]
    cols: Int[Array, "b sublanes t"]


def _dot(a, b, dims):
    """float32-accumulated `a @ b` (or `a @ b.T`).

    float32 operands follow `jax_default_matmul_precision`, like the chunked implementation;
    narrower ones use the MXU's native pass (exact products, float32 sums): Mosaic rejects a
    float32-contract precision on bf16 operands, which the global setting would ask for.
    """
    precision = None if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------------
# Kernels. Refs of one grid step; `p` query heads share each KV head (GQA) and are served by one
# program, so a K/V block and the tile's visibility mask are loaded / computed once for all p.


def _column_to_row(x):
    """`[n, 1]` -> `[1, n]` through a lane broadcast and an aligned 2-D transpose: a direct
    reshape needs a sublane gather, which v4 does not have."""
    return jnp.broadcast_to(x, (x.shape[0], LANES)).T[:1, :]


def _tile_mask(q_meta, k_meta, q_start, k_start, mode: str, keys_in_rows: bool):
    """Visibility of one tile, `[queries, keys]` (or `[keys, queries]` when `keys_in_rows`), by
    the one GRC rule (`mask.visible`) on the metadata blocks of its queries and keys.

    The rows-layout block (`[n, 128]`, field f in lane f) gives each field as `[n, 1]`, the
    cols-layout block (`[8, n]`, field f in sublane f) as `[1, n]`; `visible` broadcasts them.
    """
    n_fields = len(_FIELDS)
    if keys_in_rows:
        k = [k_meta[:, f : f + 1] for f in range(n_fields)]
        q = [q_meta[f : f + 1, :] for f in range(n_fields)]
        shape, q_axis = (k[0].shape[0], q[0].shape[1]), 1
    else:
        q = [q_meta[:, f : f + 1] for f in range(n_fields)]
        k = [k_meta[f : f + 1, :] for f in range(n_fields)]
        shape, q_axis = (q[0].shape[0], k[0].shape[1]), 0
    q_idx = q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
    k_idx = k_start + lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
    return visible(q[0], q[1], q[2], q_idx, q[3] != 0, k[0], k[1], k[2], k_idx, mode)


def _forward_kernel(
    tiles_ref, k_fetch_ref,  # scalar prefetch (SMEM)
    q_ref, k_ref, v_ref, q_meta_ref, k_meta_ref,  # [p,bq,d] [bk,d] [bk,d] [bq,128] [8,bk]
    o_ref, lse_ref,  # [p,bq,d] [p,bq]
    m_ref, l_ref, acc_ref,  # f32 scratch [p,bq,1] [p,bq,1] [p,bq,d]
    *, mode: str, scale: float, nq: int, nk: int,
):  # fmt: skip
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    bq, bk = q_ref.shape[1], k_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(tiles_ref[(b * nq + i) * nk + j] != 0)
    def _tile():
        mask = _tile_mask(q_meta_ref, k_meta_ref, i * bq, j * bk, mode, keys_in_rows=False)
        k, v = k_ref[...], v_ref[...]
        for r in range(q_ref.shape[0]):
            # Scaled after the product, as the dense reference does (bit-closer in fp32).
            s = _dot(q_ref[r], k, _NT) * scale
            m_prev = m_ref[r]
            s_max = jnp.max(jnp.where(mask, s, MASK_VALUE), axis=1, keepdims=True)
            m_new = jnp.maximum(m_prev, s_max)
            p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
            alpha = jnp.exp(m_prev - m_new)
            l_ref[r] = alpha * l_ref[r] + jnp.sum(p, axis=1, keepdims=True)
            pv = _dot(p.astype(v.dtype), v, _NN)
            acc_ref[r] = alpha * acc_ref[r] + pv
            m_ref[r] = m_new

    @pl.when(j == nk - 1)
    def _finish():
        denom = l_ref[...]
        seen = denom > 0.0  # a query that saw no key: output 0, log-sum-exp 0 (as flash.py)
        denom = jnp.where(seen, denom, 1.0)
        o_ref[...] = jnp.where(seen, acc_ref[...] / denom, 0.0).astype(o_ref.dtype)
        lse = jnp.where(seen, m_ref[...] + jnp.log(denom), 0.0)  # [p, bq, 1]
        for r in range(lse.shape[0]):
            # Stored lane-dense (queries along lanes): the residual is 4 bytes a query and head.
            lse_ref[r : r + 1, :] = _column_to_row(lse[r])


def _dq_kernel(
    tiles_ref, k_fetch_ref,  # scalar prefetch (SMEM)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_meta_ref, k_meta_ref,  # lse, delta [p,bq]
    dq_ref,  # [p,bq,d]
    dq_acc,  # f32 scratch [p,bq,d]
    *, mode: str, scale: float, nq: int, nk: int,
):  # fmt: skip
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    bq, bk = q_ref.shape[1], k_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

    @pl.when(tiles_ref[(b * nq + i) * nk + j] != 0)
    def _tile():
        mask = _tile_mask(q_meta_ref, k_meta_ref, i * bq, j * bk, mode, keys_in_rows=False)
        k, v = k_ref[...], v_ref[...]
        for r in range(q_ref.shape[0]):
            s = _dot(q_ref[r], k, _NT) * scale
            p = jnp.where(mask, jnp.exp(s - lse_ref[r][:, None]), 0.0)
            dp = _dot(do_ref[r], v, _NT)
            ds = p * (dp - delta_ref[r][:, None]) * scale
            dq_acc[r] += _dot(ds.astype(k.dtype), k, _NN)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


def _dkv_kernel(
    tiles_ref, q_fetch_ref,  # scalar prefetch (SMEM), (key block, query block) order
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, k_meta_ref, q_meta_ref,
    # [p,bq,d] [bk,d] [bk,d] [p,bq,d] [p,bq] [p,bq] [bk,128] [8,bq]
    dk_ref, dv_ref,  # [bk,d]
    dk_acc, dv_acc,  # f32 scratch [bk,d]
    *, mode: str, scale: float, nq: int, nk: int,
):  # fmt: skip
    # Keys along rows: every product is a plain or right-transposed matmul (no transposed LHS),
    # and the per-query log-sum-exp / delta are lane vectors `[1, bq]`.
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    bq, bk = q_ref.shape[1], k_ref.shape[0]

    @pl.when(i == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(tiles_ref[(b * nk + j) * nq + i] != 0)
    def _tile():
        mask = _tile_mask(q_meta_ref, k_meta_ref, i * bq, j * bk, mode, keys_in_rows=True)
        k, v = k_ref[...], v_ref[...]
        for r in range(q_ref.shape[0]):
            q, do = q_ref[r], do_ref[r]
            s = _dot(k, q, _NT) * scale
            p = jnp.where(mask, jnp.exp(s - lse_ref[r : r + 1, :]), 0.0)  # [bk, bq]
            dv_acc[...] += _dot(p.astype(v.dtype), do, _NN)
            dp = _dot(v, do, _NT)
            ds = p * (dp - delta_ref[r : r + 1, :]) * scale
            dk_acc[...] += _dot(ds.astype(q.dtype), q, _NN)

    @pl.when(i == nq - 1)
    def _finish():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------
# pallas_call wrappers over head-major arrays: q / out `[b, h, t, d]`, k / v `[b, g, t, d]`.


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, maps_pair, args, st, name):
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=st.interpret,
        name=name,
    )(*maps_pair, *args)


def _specs(q, k, st: _Static):
    """Block specs shared by the forward and dq kernels (grid `(b, g, i, j)`)."""
    b, h, t, d = q.shape
    p = h // k.shape[1]
    bq, bk = st.block_q, st.block_k
    nq, nk = t // bq, t // bk

    def kb(bi, i, j, fetch):  # the key block held at step (bi, i, j)
        return fetch[(bi * nq + i) * nk + j]

    q_spec = pl.BlockSpec((None, p, bq, d), lambda bi, gi, i, j, *_: (bi, gi, i, 0))
    kv_spec = pl.BlockSpec(
        (None, None, bk, d), lambda bi, gi, i, j, tiles, fetch: (bi, gi, kb(bi, i, j, fetch), 0)
    )
    # Per-query statistics `[b, g, p, t]`: a block's last two dims are (all p, bq queries).
    stat_spec = pl.BlockSpec((None, None, p, bq), lambda bi, gi, i, j, *_: (bi, gi, 0, i))
    q_meta = pl.BlockSpec((None, bq, LANES), lambda bi, gi, i, j, *_: (bi, i, 0))
    k_meta = pl.BlockSpec(
        (None, SUBLANES, bk), lambda bi, gi, i, j, tiles, fetch: (bi, 0, kb(bi, i, j, fetch))
    )
    return q_spec, kv_spec, stat_spec, q_meta, k_meta, (b, k.shape[1], nq, nk)


def _forward(q, k, v, maps: _Maps, st: _Static):
    """(output `[b, h, t, d]` in q's dtype, log-sum-exp `[b, g, p, t]` float32)."""
    q_spec, kv_spec, stat_spec, q_meta, k_meta, grid = _specs(q, k, st)
    p, bq, d = q_spec.block_shape[1:]
    kernel = functools.partial(
        _forward_kernel, mode=st.memory_mode, scale=q.shape[-1] ** -0.5, nq=grid[2], nk=grid[3]
    )
    f32 = jnp.float32
    lse_shape = (*grid[:2], p, q.shape[2])
    return _call(
        kernel, grid, [q_spec, kv_spec, kv_spec, q_meta, k_meta], [q_spec, stat_spec],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(lse_shape, f32)],
        [pltpu.VMEM((p, bq, 1), f32), pltpu.VMEM((p, bq, 1), f32), pltpu.VMEM((p, bq, d), f32)],
        (maps.tiles, maps.k_fetch), (q, k, v, maps.rows, maps.cols), st, "grc_flash_forward",
    )  # fmt: skip


def _backward(q, k, v, maps: _Maps, out, lse, dout, st: _Static):
    """(dq, dk, dv) by two kernels: dq over (query block, key block), dk / dv over (key block,
    query block), both recomputing the probabilities from the log-sum-exp."""
    b, h, t, d = q.shape
    g = k.shape[1]
    p, bq, bk = h // g, st.block_q, st.block_k
    nq, nk = t // bq, t // bk
    f32 = jnp.float32
    scale = d**-0.5
    # delta_i = rowsum(dO * O): the softmax backward's per-query term (0 for unseen queries).
    delta = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1).reshape(lse.shape)  # b g p t

    q_spec, kv_spec, stat_spec, q_meta, k_meta, grid = _specs(q, k, st)
    dq_kernel = functools.partial(_dq_kernel, mode=st.memory_mode, scale=scale, nq=nq, nk=nk)
    dq = _call(
        dq_kernel, grid,
        [q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec, q_meta, k_meta], q_spec,
        jax.ShapeDtypeStruct(q.shape, q.dtype), [pltpu.VMEM((p, bq, d), f32)],
        (maps.tiles, maps.k_fetch), (q, k, v, dout, lse, delta, maps.rows, maps.cols), st,
        "grc_flash_dq",
    )  # fmt: skip

    def qb(bi, j, i, fetch):  # the query block held at step (bi, j, i)
        return fetch[(bi * nk + j) * nq + i]

    q_at = pl.BlockSpec(
        (None, p, bq, d), lambda bi, gi, j, i, tiles, fetch: (bi, gi, qb(bi, j, i, fetch), 0)
    )
    kv_at = pl.BlockSpec((None, None, bk, d), lambda bi, gi, j, i, *_: (bi, gi, j, 0))
    stat_at = pl.BlockSpec(
        (None, None, p, bq), lambda bi, gi, j, i, tiles, fetch: (bi, gi, 0, qb(bi, j, i, fetch))
    )
    k_rows = pl.BlockSpec((None, bk, LANES), lambda bi, gi, j, i, *_: (bi, j, 0))
    q_cols = pl.BlockSpec(
        (None, SUBLANES, bq), lambda bi, gi, j, i, tiles, fetch: (bi, 0, qb(bi, j, i, fetch))
    )
    dkv_kernel = functools.partial(_dkv_kernel, mode=st.memory_mode, scale=scale, nq=nq, nk=nk)
    dk, dv = _call(
        dkv_kernel, (b, g, nk, nq),
        [q_at, kv_at, kv_at, q_at, stat_at, stat_at, k_rows, q_cols], [kv_at, kv_at],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        [pltpu.VMEM((bk, d), f32), pltpu.VMEM((bk, d), f32)],
        (maps.tiles_t, maps.q_fetch),
        (q, k, v, dout, lse, delta, maps.rows, maps.cols), st, "grc_flash_dkv",
    )  # fmt: skip
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, maps: _Maps, st: _Static):
    return _forward(q, k, v, maps, st)[0]


def _attend_fwd(q, k, v, maps, st):
    out, lse = _forward(q, k, v, maps, st)
    return out, (q, k, v, maps, out, lse)


def _attend_bwd(st, res, dout):
    q, k, v, maps, out, lse = res
    return (*_backward(q, k, v, maps, out, lse, dout, st), None)


_attend.defvjp(_attend_fwd, _attend_bwd)


# ---------------------------------------------------------------------------------------------
# Layout -> kernel inputs, and the public entry points.


def row_tiles(meta: TokenMeta, block_q: int, block_k: int) -> Bool[Array, "b nq nk"]:
    """Per-row tile map: `tile_visibility` of each row alone (a packed row skips the tiles its
    own examples leave empty, not only those empty in every row of the batch)."""
    one_row = lambda row: tile_visibility(jax.tree.map(lambda a: a[None], row), block_q, block_k)  # noqa: E731
    return jax.vmap(one_row)(meta)


def fetch_index(tiles: Bool[Array, "b n m"]) -> Int[Array, "b n m"]:
    """For each step along the last axis, the block to hold: the step's own where the tile is
    computed; else the next computed one (prefetched early), else the last one (no new DMA)."""
    m = tiles.shape[-1]
    idx = jnp.arange(m, dtype=jnp.int32)
    nxt = lax.cummin(jnp.where(tiles, idx, m), axis=tiles.ndim - 1, reverse=True)
    prev = lax.cummax(jnp.where(tiles, idx, -1), axis=tiles.ndim - 1)
    return jnp.where(nxt < m, nxt, jnp.maximum(prev, 0)).astype(jnp.int32)


def _maps(meta: TokenMeta, block_q: int, block_k: int) -> _Maps:
    tiles = row_tiles(meta, block_q, block_k)
    tiles_t = jnp.swapaxes(tiles, 1, 2)
    fields = jnp.stack([getattr(meta, f).astype(jnp.int32) for f in _FIELDS], axis=1)  # b F t
    b, n_fields, t = fields.shape
    cols = jnp.pad(fields, [(0, 0), (0, SUBLANES - n_fields), (0, 0)])
    flat = lambda x: x.astype(jnp.int32).reshape(-1)  # noqa: E731
    return _Maps(
        tiles=flat(tiles),
        k_fetch=flat(fetch_index(tiles)),
        tiles_t=flat(tiles_t),
        q_fetch=flat(fetch_index(tiles_t)),
        rows=jnp.pad(jnp.swapaxes(fields, 1, 2), [(0, 0), (0, 0), (0, LANES - n_fields)]),
        cols=cols,
    )


def flash_attention_tpu(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b t g d"],
    v: Float[Array, "b t g d"],
    layout: FlashLayout,
    *,
    block_q: int = 512,
    block_k: int = 512,
    interpret: bool | pltpu.InterpretParams = False,
) -> Float[Array, "b t h d"]:
    """GRC attention of packed training rows as Pallas TPU kernels (forward and custom VJP).

    Args:
      layout: from `flash_layout`; its metadata is used, the tile map is recomputed per row at
        this kernel's block sizes.
      block_q, block_k: query / key tokens per tile (clipped to the row length; on a TPU
        multiples of 128 keep every block lane-aligned).
      interpret: run in the Pallas TPU interpreter on CPU (`True` or `pltpu.InterpretParams`).
    """
    b, t, h, d = q.shape
    g = k.shape[2]
    if h % g:
        raise ValueError(f"GQA: query heads ({h}) must be a multiple of KV heads ({g})")
    meta = layout.meta
    t_meta = meta.segment_ids.shape[-1]
    if t_meta < t:
        raise ValueError(f"layout covers {t_meta} tokens, q has {t}")
    bq, bk = min(block_q, t_meta), min(block_k, t_meta)
    if bq % SUBLANES or bk % SUBLANES:
        raise ValueError(f"block sizes must be multiples of {SUBLANES}, got {bq} and {bk}")
    step = math.lcm(bq, bk)
    padded = -(-t_meta // step) * step
    if padded != t_meta:
        meta = meta.pad_to(padded)  # segment 0: padding sees nothing and is seen by nobody

    def head_major(x):
        x = jnp.pad(x, [(0, 0), (0, padded - t), (0, 0), (0, 0)]) if padded != t else x
        return x.transpose(0, 2, 1, 3)

    if interpret is True:
        interpret = pltpu.InterpretParams()
    st = _Static(bq, bk, meta.memory_mode, interpret)
    out = _attend(head_major(q), head_major(k), head_major(v), _maps(meta, bq, bk), st)
    return out.transpose(0, 2, 1, 3)[:, :t]


# ---------------------------------------------------------------------------------------------
# `model.attention_impl="kernel"`: the kernel on a TPU, the chunked implementation elsewhere.

_interpret: Any = None  # set only by `interpret_kernel` (tests run the kernel in the model on CPU)


@contextlib.contextmanager
def interpret_kernel(params: bool | pltpu.InterpretParams = True):
    """Within this context (at trace time), `kernel_attention` runs the kernel in the Pallas TPU
    interpreter whatever the backend; for tests of the kernel inside the model on CPU."""
    global _interpret
    saved, _interpret = _interpret, params
    try:
        yield
    finally:
        _interpret = saved


@functools.cache
def _log_fallback(backend: str) -> None:
    _log.warning(
        "model.attention_impl=kernel: the GRC flash attention kernel is TPU-only; on backend %r "
        "the chunked implementation is used",
        backend,
    )


def kernel_attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b t g d"],
    v: Float[Array, "b t g d"],
    layout: FlashLayout,
) -> Float[Array, "b t h d"]:
    """`attention_impl="kernel"`: `flash_attention_tpu` (blocks of `layout.chunk`) on a TPU or
    under `interpret_kernel`, else the chunked `flash_attention`, with one log line a process.

    Inside `activation_sharding` the kernel runs per device (`_per_device`), and the backend is
    the mesh's: `grc aot` compiles for TPU devices from a CPU host.
    """
    mesh = current_mesh()
    backend = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    if _interpret is None and backend != "tpu":
        _log_fallback(backend)
        return flash_attention(q, k, v, layout)
    kernel = functools.partial(
        flash_attention_tpu,
        block_q=layout.chunk,
        block_k=layout.chunk,
        interpret=False if _interpret is None else _interpret,
    )
    return kernel(q, k, v, layout) if mesh is None else _per_device(kernel, mesh, q, k, v, layout)


def _per_device(kernel, mesh: Mesh, q, k, v, layout: FlashLayout):
    """`kernel` under `shard_map`: rows split as the activations are (`activation_batch`), heads
    as `activation_heads` / `activation_kv_heads` when both split alike (a query head's KV head
    must be on its device), else replicated. XLA cannot partition a Mosaic call by itself: without
    this it would gather every row and head onto every device."""
    sizes = dict(mesh.shape)
    names = ["activation_batch", "activation_length", "activation_heads", "head_dim"]
    q_spec = logical_to_spec(names, q.shape, sizes)
    k_spec = logical_to_spec([*names[:2], "activation_kv_heads", names[3]], k.shape, sizes)
    if q_spec[2] != k_spec[2]:
        q_spec = k_spec = PartitionSpec(q_spec[0], None, None, None)
    row = PartitionSpec(q_spec[0], None)
    meta = layout.meta

    def local(q, k, v, seg, blk, role, in_comp, tiles):
        local_meta = TokenMeta(seg, blk, role, in_comp, meta.memory_mode)
        return kernel(q, k, v, FlashLayout(local_meta, tiles, layout.chunk))

    return jax.shard_map(
        local, mesh=mesh, in_specs=(q_spec, k_spec, k_spec, row, row, row, row, PartitionSpec()),
        out_specs=q_spec, check_vma=False,
    )(q, k, v, meta.segment_ids, meta.block_ids, meta.roles, meta.in_compression_block,
      layout.tiles)  # fmt: skip
