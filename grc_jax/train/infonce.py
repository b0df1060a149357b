"""InfoNCE over the query and document slots of a packed batch, scored shard-wise in tiles.

A batch has `B * S` example slots (`S` = most examples a row can hold), most of them empty, so
the dense `[B*S, B*S]` score matrix of every slot against every slot is mostly wasted (about
12 GB in float32 at `llama3_8b` shapes). Here each device

1. moves its query slots to the front of its own slots, and gathers the slots of every device
   with their document slots moved to the front (a stable sort: the static shapes jit needs,
   with the real counts known at run time);
2. scores its queries against the gathered documents tile by tile (`QUERY_TILE x DOC_TILE`),
   with an online log-sum-exp, in loops that stop at the real counts: the work is about
   `queries x documents`, not `slots x slots`, and no tile of scores outlives its step;
3. sums its queries' losses; the sums and counts are added over devices (`psum`).

The gradient (`jax.custom_vjp`) recomputes the tiles rather than storing them; the documents'
gradients, summed over the devices' queries, go back to their own device (`psum_scatter`).

The rules are those of the dense reference (kept in the tests): a query's positive is the
document slot of its group flagged positive; other slots of the same document (same `seg_doc`)
are not among its negatives; a query without a positive in the batch is ignored. If a group
flags several positives the best-scoring one is the target (as `max` picks) and its gradient
goes to the first of them in slot order when several score exactly the same.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Float, Int

from grc_jax.core.roles import DOC, QUERY
from grc_jax.core.sharding import batch_mesh_axes, current_mesh

QUERY_TILE = 128
DOC_TILE = 512

_NEG = -1e30
# Columns of the stacked slot metadata.
_KIND, _GROUP, _POSITIVE, _DOC = range(4)


def info_nce(
    emb: Float[Array, "n p"],
    kind: Int[Array, " n"],
    group: Int[Array, " n"],
    positive: Int[Array, " n"],
    doc: Int[Array, " n"],
    temp: Float[Array, ""] | float,
    query_tile: int = QUERY_TILE,
    doc_tile: int = DOC_TILE,
) -> tuple[Array, Array]:
    """(sum over queries of InfoNCE, number of queries with a positive) over flattened slots.

    Each query is scored against every document slot; its target is the document of its own
    group flagged positive, other copies of that document are not negatives, and a query without
    a positive in the batch is ignored. Inside `activation_sharding` the slots are split over the
    batch's mesh axes and each device scores its own queries (module docstring).
    """
    mesh = current_mesh()
    axes = batch_mesh_axes(mesh) if mesh is not None else ()
    shards = math.prod(mesh.shape[a] for a in axes) if axes else 1
    meta = jnp.stack([kind, group, positive, doc], axis=1).astype(jnp.int32)
    pad = -emb.shape[0] % shards  # padding slots are empty (kind 0)
    if pad:
        emb = jnp.pad(emb, ((0, pad), (0, 0)))
        meta = jnp.pad(meta, ((0, pad), (0, 0)))
    emb, temp = emb.astype(jnp.float32), jnp.asarray(temp, jnp.float32)
    fn = _make_info_nce(mesh if axes else None, axes, query_tile, doc_tile)
    return fn(emb, temp, meta)


@functools.cache
def _make_info_nce(mesh: Mesh | None, axes: tuple[str, ...], query_tile: int, doc_tile: int):
    """The custom-gradient InfoNCE `(emb, temp, meta) -> (sum, count)` for one mesh layout."""
    tiles = dict(query_tile=query_tile, doc_tile=doc_tile, axes=axes)
    forward = functools.partial(_local_forward, **tiles)
    backward = functools.partial(_local_backward, **tiles)
    if mesh is not None:
        rows, whole = PartitionSpec(axes), PartitionSpec()
        # Replicated over the other mesh axes (tensor): each of their devices repeats the work.
        forward = jax.shard_map(
            forward, mesh=mesh, in_specs=(rows, whole, rows),
            out_specs=(whole, whole, rows), check_vma=False,
        )  # fmt: skip
        backward = jax.shard_map(
            backward, mesh=mesh, in_specs=(rows, whole, rows, rows, whole),
            out_specs=(rows, whole), check_vma=False,
        )  # fmt: skip

    @jax.custom_vjp
    def nce(emb, temp, meta):
        total, count, _ = forward(emb, temp, meta)
        return total, count

    def nce_fwd(emb, temp, meta):
        total, count, stats = forward(emb, temp, meta)
        return (total, count), (emb, temp, meta, stats)

    def nce_bwd(res, cotangents):
        emb, temp, meta, stats = res
        g_total, _ = cotangents  # the count does not depend on the embeddings
        d_emb, d_temp = backward(emb, temp, meta, stats, g_total)
        return d_emb, d_temp.astype(temp.dtype), None

    nce.defvjp(nce_fwd, nce_bwd)
    return nce


def _gather(x: Array, axes: tuple[str, ...]) -> Array:
    return jax.lax.all_gather(x, axes, axis=0, tiled=True) if axes else x


def _compact(mask: Array, tile: int) -> tuple[Array, Array]:
    """(indices of `mask`'s slots first, in order, then the others, padded to a multiple of
    `tile`; how many slots `mask` holds)."""
    order = jnp.argsort(jnp.logical_not(mask).astype(jnp.int32), stable=True)
    return jnp.pad(order, (0, -order.shape[0] % tile)), jnp.sum(mask.astype(jnp.int32))


class _Slots:
    """The slots one device scores: its own queries (compacted) and every device's documents
    (gathered, compacted), read a tile at a time."""

    def __init__(self, emb, meta, axes, query_tile, doc_tile):
        self.emb_q, self.meta_q = emb, meta
        self.emb_d, self.meta_d = _gather(emb, axes), _gather(meta, axes)
        self.qt, self.dt = min(query_tile, emb.shape[0]), min(doc_tile, self.emb_d.shape[0])
        self.q_index, self.nq = _compact(meta[:, _KIND] == QUERY, self.qt)
        self.d_index, self.nd = _compact(self.meta_d[:, _KIND] == DOC, self.dt)

    def query_tiles(self):
        return (self.nq + self.qt - 1) // self.qt

    def doc_tiles(self):
        return (self.nd + self.dt - 1) // self.dt

    def queries(self, i):
        """(row indices, embeddings, metadata, valid) of query tile `i`."""
        rows = jax.lax.dynamic_slice_in_dim(self.q_index, i * self.qt, self.qt)
        valid = i * self.qt + jnp.arange(self.qt) < self.nq
        return rows, self.emb_q[rows], self.meta_q[rows], valid

    def scores(self, q, qm, j, temp):
        """(doc rows, doc embeddings, scores, positive mask, allowed mask) of doc tile `j`."""
        cols = jax.lax.dynamic_slice_in_dim(self.d_index, j * self.dt, self.dt)
        d, dm = self.emb_d[cols], self.meta_d[cols]
        valid = (j * self.dt + jnp.arange(self.dt) < self.nd)[None, :]
        s = (q @ d.T) / temp  # [qt, dt]
        same_group = dm[None, :, _GROUP] == qm[:, None, _GROUP]
        pos = valid & (dm[None, :, _POSITIVE] == 1) & same_group
        duplicate = (dm[None, :, _DOC] == qm[:, None, _DOC]) & ~pos
        return cols, d, s, pos, valid & ~duplicate


def _local_forward(emb, temp, meta, *, axes, query_tile, doc_tile):
    """(loss sum, count, per-slot stats) on one device. The stats, `[nl]` each, for the
    backward pass: the log-sum-exp of a query's scores and its positive's index among the
    gathered slots (-1: no positive, or not a query)."""
    slots = _Slots(emb, meta, axes, query_tile, doc_tile)
    qt, nl = slots.qt, emb.shape[0]

    def query_tile_body(i, carry):
        stats, total, count = carry
        rows, q, qm, q_valid = slots.queries(i)

        def doc_tile_body(j, acc):
            m, total_exp, p, arg = acc
            cols, _, s, pos, allowed = slots.scores(q, qm, j, temp)
            masked = jnp.where(allowed, s, _NEG)
            m_new = jnp.maximum(m, jnp.max(masked, axis=1))
            total_exp = total_exp * jnp.exp(m - m_new) + jnp.sum(
                jnp.where(allowed, jnp.exp(masked - m_new[:, None]), 0.0), axis=1
            )
            pos_s = jnp.where(pos, s, _NEG)
            best = jnp.argmax(pos_s, axis=1)  # the first of equal scores
            tile_p = jnp.take_along_axis(pos_s, best[:, None], axis=1)[:, 0]
            better = jnp.any(pos, axis=1) & (tile_p > p)
            p_new = jnp.where(better, tile_p, p)
            return m_new, total_exp, p_new, jnp.where(better, cols[best], arg)

        init = (
            jnp.full((qt,), _NEG, jnp.float32), jnp.zeros((qt,), jnp.float32),
            jnp.full((qt,), _NEG, jnp.float32), jnp.full((qt,), -1, jnp.int32),
        )  # fmt: skip
        m, total_exp, p, arg = jax.lax.fori_loop(0, slots.doc_tiles(), doc_tile_body, init)
        lse = m + jnp.log(jnp.maximum(total_exp, 1e-37))
        has_pos = q_valid & (arg >= 0)
        total = total + jnp.sum(jnp.where(has_pos, lse - p, 0.0))
        count = count + jnp.sum(has_pos.astype(jnp.float32))
        # The last tile's rows past the queries (other slots, or row 0 as padding) are dropped.
        where = jnp.where(q_valid, rows, nl)
        tile = (lse, jnp.where(has_pos, arg, -1))
        stats = tuple(x.at[where].set(y, mode="drop") for x, y in zip(stats, tile, strict=True))
        return stats, total, count

    empty = (jnp.zeros(nl), jnp.full(nl, -1, jnp.int32))
    init = (empty, jnp.float32(0), jnp.float32(0))
    stats, total, count = jax.lax.fori_loop(0, slots.query_tiles(), query_tile_body, init)
    if axes:
        total, count = jax.lax.psum((total, count), axes)
    return total, count, stats


def _local_backward(emb, temp, meta, stats, g, *, axes, query_tile, doc_tile):
    """(d loss / d emb for this device's slots, d loss / d temp): the tiles again, with
    d loss / d score = g (softmax - one-hot of the positive) for each query with a positive."""
    slots = _Slots(emb, meta, axes, query_tile, doc_tile)
    nl = emb.shape[0]

    def query_tile_body(i, carry):
        d_emb_q, d_emb_d, d_temp = carry
        rows, q, qm, q_valid = slots.queries(i)
        lse, arg = (x[rows] for x in stats)
        weight = jnp.where(q_valid & (arg >= 0), g, 0.0)[:, None]

        def doc_tile_body(j, acc):
            d_q, d_emb_d, d_temp = acc
            cols, d, s, _, allowed = slots.scores(q, qm, j, temp)
            soft = jnp.where(allowed, jnp.exp(jnp.where(allowed, s, _NEG) - lse[:, None]), 0.0)
            target = (cols[None, :] == arg[:, None]).astype(s.dtype)
            ds = weight * (soft - target)  # d loss / d score, [qt, dt]
            d_q = d_q + (ds @ d) / temp
            # The last tile's columns past the documents have ds = 0: adding them is harmless.
            d_emb_d = d_emb_d.at[cols].add((ds.T @ q) / temp)
            return d_q, d_emb_d, d_temp - jnp.sum(ds * s) / temp

        init = (jnp.zeros_like(q), d_emb_d, d_temp)
        d_q, d_emb_d, d_temp = jax.lax.fori_loop(0, slots.doc_tiles(), doc_tile_body, init)
        d_emb_q = d_emb_q.at[jnp.where(q_valid, rows, nl)].add(d_q, mode="drop")
        return d_emb_q, d_emb_d, d_temp

    init = (jnp.zeros_like(emb), jnp.zeros_like(slots.emb_d), jnp.float32(0))
    d_emb_q, d_emb_d, d_temp = jax.lax.fori_loop(0, slots.query_tiles(), query_tile_body, init)
    if axes:
        # Every device scored its queries against all documents: sum those gradients and hand
        # each device its own slots' share.
        d_emb_d = jax.lax.psum_scatter(d_emb_d, axes, scatter_dimension=0, tiled=True)
        d_temp = jax.lax.psum(d_temp, axes)
    return d_emb_q + d_emb_d, d_temp
