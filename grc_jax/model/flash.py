"""GRC flash attention for the training pass: memory O(t x chunk), never a `[t, t]` mask.

The visibility rule (`grc_jax.model.mask.visible`) is evaluated per tile of `chunk` queries x
`chunk` keys from per-token metadata (`TokenMeta`); tiles that `tile_visibility` proves empty are
skipped (`lax.cond`), and causality bounds each loop, so only the tiles at or below the diagonal
that share an example are computed. Softmax is online (running max and sum per query, float32).
A custom VJP recomputes each tile's probabilities in the backward pass from the saved
log-sum-exp, so neither pass keeps per-tile scores: residuals are q, k, v, the output and one
float per query and head.

A query that sees no key (padding) gets 0, as in the dense reference
(`layers.dot_product_attention`). This pure-JAX version is the CPU path and the fallback of the
Pallas TPU kernel.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from grc_jax.core.constants import MASK_VALUE
from grc_jax.model.mask import TokenMeta, tile_visibility, visible


@flax.struct.dataclass
class FlashLayout:
    """What every layer's attention needs: the metadata padded to a multiple of `chunk`, and the
    tiles that may hold a visible pair (`tiles[i, j]`: query chunk i, key chunk j)."""

    __no_type_check__ = True  # leaves travel through transforms as tracers and sentinels

    meta: TokenMeta
    tiles: Bool[Array, "nq nk"]
    chunk: int = flax.struct.field(pytree_node=False, default=512)


def flash_layout(meta: TokenMeta, chunk: int) -> FlashLayout:
    """The layout for rows of `meta`'s length; a row shorter than `chunk` is one tile."""
    t = meta.segment_ids.shape[-1]
    chunk = min(chunk, t)
    padded = meta.pad_to(-(-t // chunk) * chunk)
    return FlashLayout(padded, tile_visibility(padded, chunk, chunk), chunk)


def _chunks(x: Array, c: int) -> Array:
    """`[b, t, ...]` -> `[t // c, b, c, ...]`."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // c, c, *x.shape[2:]), 1, 0)


def _q_chunks(x: Array, c: int, g: int) -> Array:
    """Queries (or output / its cotangent) `[b, t, h, d]` -> `[n, b, g, q_per_kv, c, d]`."""
    b, t, h, d = x.shape
    return x.reshape(b, t // c, c, g, h // g, d).transpose(1, 0, 3, 4, 2, 5)


def _from_q_chunks(x: Array) -> Array:
    n, b, g, p, c, d = x.shape
    return x.transpose(1, 0, 4, 2, 3, 5).reshape(b, n * c, g * p, d)


_META_FIELDS = ("segment_ids", "block_ids", "roles", "in_compression_block")


def _meta_chunks(meta: TokenMeta, c: int) -> dict[str, Array]:
    """Each metadata field `[b, t]` as `[t // c, b, c]`."""
    return {f: _chunks(getattr(meta, f), c) for f in _META_FIELDS}


def _tile_mask(meta_c: dict[str, Array], mode: str, i, j, c: int) -> Array:
    """`[b, 1, 1, c, c]` visibility of key chunk j from query chunk i."""
    q = {f: a[i][:, :, None] for f, a in meta_c.items()}
    k = {f: a[j][:, None, :] for f, a in meta_c.items()}
    q_idx = (i * c + jnp.arange(c))[None, :, None]
    k_idx = (j * c + jnp.arange(c))[None, None, :]
    mask = visible(
        q["segment_ids"], q["block_ids"], q["roles"], q_idx, q["in_compression_block"],
        k["segment_ids"], k["block_ids"], k["roles"], k_idx, mode,
    )  # fmt: skip
    return mask[:, None, None]


def _scores(q_i, k_j, scale):
    """`[b, g, p, c, c]` float32 scores; scaled after the product, as the dense reference does."""
    return jnp.einsum("bgpqd,bkgd->bgpqk", q_i, k_j, preferred_element_type=jnp.float32) * scale


def _prepared(q, k, v, layout: FlashLayout):
    """(chunk, scale, q / k / v chunks, metadata chunks, memory mode): both passes' inputs."""
    c, g = layout.chunk, k.shape[2]
    chunks = (_q_chunks(q, c, g), _chunks(k, c), _chunks(v, c))
    return c, q.shape[-1] ** -0.5, chunks, _meta_chunks(layout.meta, c), layout.meta.memory_mode


def _forward(q, k, v, layout: FlashLayout):
    """(output chunks `[n, b, g, p, c, d]` in q's dtype, log-sum-exp `[n, b, g, p, c]`)."""
    c, scale, (q_c, k_c, v_c), meta_c, mode = _prepared(q, k, v, layout)
    n = q.shape[1] // c

    def one_query_chunk(i):
        q_i = q_c[i]

        def tile(j, carry):
            m, denom, acc = carry
            mask = _tile_mask(meta_c, mode, i, j, c)
            s = _scores(q_i, k_c[j], scale)
            m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, MASK_VALUE), axis=-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum(
                "bgpqk,bkgd->bgpqd", p.astype(v.dtype), v_c[j], preferred_element_type=jnp.float32
            )
            return m_new, alpha * denom + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

        def step(j, carry):
            return lax.cond(layout.tiles[i, j], functools.partial(tile, j), lambda x: x, carry)

        stats = q_i.shape[:-1]
        init = (
            jnp.full(stats, MASK_VALUE, jnp.float32),
            jnp.zeros(stats, jnp.float32),
            jnp.zeros(q_i.shape, jnp.float32),
        )
        # Causality: key chunks after the query chunk hold no visible key.
        m, denom, acc = lax.fori_loop(0, i + 1, step, init)
        seen = denom > 0
        denom = jnp.where(seen, denom, 1.0)
        out = jnp.where(seen[..., None], acc / denom[..., None], 0.0)
        return out.astype(q.dtype), jnp.where(seen, m + jnp.log(denom), 0.0)

    return lax.map(one_query_chunk, jnp.arange(n))


def _backward(q, k, v, layout: FlashLayout, out_c, lse_c, dout):
    c, scale, (q_c, k_c, v_c), meta_c, mode = _prepared(q, k, v, layout)
    n = q.shape[1] // c
    do_c = _q_chunks(dout, c, k.shape[2])
    # D_i = rowsum(dO * O): the softmax backward's per-query term.
    delta_c = jnp.sum(do_c.astype(jnp.float32) * out_c.astype(jnp.float32), axis=-1)

    def one_key_chunk(dq, j):
        k_j, v_j = k_c[j], v_c[j]

        def tile(i, carry):
            dk, dv, dq = carry
            mask = _tile_mask(meta_c, mode, i, j, c)
            q_i, do_i = q_c[i], do_c[i]
            p = jnp.where(mask, jnp.exp(_scores(q_i, k_j, scale) - lse_c[i][..., None]), 0.0)
            dv = dv + jnp.einsum(
                "bgpqk,bgpqd->bkgd", p.astype(v.dtype), do_i, preferred_element_type=jnp.float32
            )
            dp = jnp.einsum("bgpqd,bkgd->bgpqk", do_i, v_j, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_c[i][..., None]) * scale
            dq = dq.at[i].add(
                jnp.einsum("bgpqk,bkgd->bgpqd", ds.astype(k.dtype), k_j,
                           preferred_element_type=jnp.float32)
            )  # fmt: skip
            dk = dk + jnp.einsum(
                "bgpqk,bgpqd->bkgd", ds.astype(q.dtype), q_i, preferred_element_type=jnp.float32
            )
            return dk, dv, dq

        def step(i, carry):
            return lax.cond(layout.tiles[i, j], functools.partial(tile, i), lambda x: x, carry)

        zeros = jnp.zeros(k_j.shape, jnp.float32)
        # Causality: query chunks before the key chunk see none of its keys.
        dk, dv, dq = lax.fori_loop(j, n, step, (zeros, zeros, dq))
        return dq, (dk, dv)

    dq, (dk_c, dv_c) = lax.scan(one_key_chunk, jnp.zeros(q_c.shape, jnp.float32), jnp.arange(n))
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(k.shape)  # noqa: E731
    return (
        _from_q_chunks(dq).astype(q.dtype),
        unchunk(dk_c).astype(k.dtype),
        unchunk(dv_c).astype(v.dtype),
    )


@jax.custom_vjp
def _flash(q, k, v, layout):
    return _from_q_chunks(_forward(q, k, v, layout)[0])


def _flash_fwd(q, k, v, layout):
    out_c, lse_c = _forward(q, k, v, layout)
    return _from_q_chunks(out_c), (q, k, v, layout, out_c, lse_c)


def _flash_bwd(res, dout):
    q, k, v, layout, out_c, lse_c = res
    dq, dk, dv = _backward(q, k, v, layout, out_c, lse_c, dout)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b t g d"],
    v: Float[Array, "b t g d"],
    layout: FlashLayout,
) -> Float[Array, "b t h d"]:
    """GRC attention of a packed training row (the same values as the dense reference)."""
    t = q.shape[1]
    padded = layout.meta.segment_ids.shape[-1]
    if padded != t:
        pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - t), (0, 0), (0, 0)])  # noqa: E731
        return _flash(pad(q), pad(k), pad(v), layout)[:, :t]
    return _flash(q, k, v, layout)
