"""The GRC visibility rule (DESIGN.md section 2): the one place that decides who sees whom.

Every attention path (dense XLA, Pallas, decode) must agree with `grc_mask`, the dense boolean
reference built here. `visible` is the elementwise rule on broadcast query/key metadata so that a
decode path can evaluate it on cached keys without materialising a square mask.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from grc_jax.core.constants import MEMORY_MODES, MemoryMode
from grc_jax.core.errors import ConfigError
from grc_jax.core.roles import LATENT


def visible(
    q_seg: Array,
    q_blk: Array,
    q_role: Array,
    q_idx: Array,
    q_in_compression_block: Array,
    k_seg: Array,
    k_blk: Array,
    k_role: Array,
    k_idx: Array,
    memory_mode: MemoryMode,
) -> Array:
    """Elementwise visibility of key token k from query token q (all arguments broadcast).

    `q_in_compression_block` says whether the query's block holds latent tokens; `*_idx` is the
    index order of the packed row (causality is by index, not by RoPE position).
    """
    if memory_mode not in MEMORY_MODES:
        raise ConfigError(f"memory_mode: expected one of {MEMORY_MODES}, got {memory_mode!r}")
    same_example = (q_seg == k_seg) & (q_seg != 0)
    causal = k_idx <= q_idx
    k_latent = k_role == LATENT
    q_latent = q_role == LATENT
    # Same block: everything except that non-latent tokens never see latents (non-intrusive).
    same_block = (q_blk == k_blk) & ~(k_latent & ~q_latent)
    if memory_mode == "independent":
        # Consumer blocks read the latents of every earlier compression block; compression blocks
        # read nothing outside themselves.
        earlier = (k_blk < q_blk) & k_latent & ~q_in_compression_block
    else:
        # Each block reads only the running memory: the latents of the block just before it.
        earlier = (k_blk == q_blk - 1) & k_latent
    return same_example & causal & (same_block | earlier)


def compression_block_flags(
    segment_ids: Int[Array, "b t"], block_ids: Int[Array, "b t"], roles: Int[Array, "b t"]
) -> Bool[Array, "b t"]:
    """For each token: does its (example, block) contain at least one LATENT token?

    O(t log t) per row (a sort by (segment, block), then one max per run), never `[t, t]`: the
    blocks of a row need not be contiguous.
    """
    t = segment_ids.shape[-1]

    def row(seg, blk, role):
        order = jnp.lexsort((blk, seg))
        s, k = seg[order], blk[order]
        starts = jnp.concatenate([jnp.ones((1,), bool), (s[1:] != s[:-1]) | (k[1:] != k[:-1])])
        run = jnp.cumsum(starts) - 1
        has = jax.ops.segment_max((role[order] == LATENT).astype(jnp.int32), run, t) > 0
        return jnp.zeros((t,), bool).at[order].set(has[run])

    return jax.vmap(row)(segment_ids, block_ids, roles)


@flax.struct.dataclass
class TokenMeta:
    """Per-token metadata from which `visible` decides every (query, key) pair: the inputs of an
    attention that never builds the `[t, t]` mask (`grc_jax.model.flash`). Fields `[b, t]`."""

    __no_type_check__ = True  # leaves travel through transforms as tracers and sentinels

    segment_ids: Int[Array, "b t"]
    block_ids: Int[Array, "b t"]
    roles: Int[Array, "b t"]
    in_compression_block: Bool[Array, "b t"]
    memory_mode: str = flax.struct.field(pytree_node=False, default="independent")

    @classmethod
    def build(cls, segment_ids, block_ids, roles, memory_mode: MemoryMode) -> TokenMeta:
        if memory_mode not in MEMORY_MODES:
            raise ConfigError(f"memory_mode: expected one of {MEMORY_MODES}, got {memory_mode!r}")
        flags = compression_block_flags(segment_ids, block_ids, roles)
        return cls(segment_ids, block_ids, roles, flags, memory_mode)

    def pad_to(self, t: int) -> TokenMeta:
        """Padded with segment 0 (padding: sees nothing, seen by nobody) to length `t`."""
        extra = t - self.segment_ids.shape[-1]
        pad = lambda a: jnp.pad(a, [(0, 0), (0, extra)])  # noqa: E731
        return jax.tree.map(pad, self)


def tile_visibility(meta: TokenMeta, q_chunk: int, k_chunk: int) -> Bool[Array, "nq nk"]:
    """Whether tile (query chunk i, key chunk j) may hold a visible pair in any row of the batch.

    Conservative (never False where `visible` holds somewhere in the tile), computed from per-tile
    summaries, each a necessary condition of `visible`: the key chunk starts at or before the
    query chunk's last index (causality); both chunks hold a real (non-padding) token and their
    ranges of segment ids overlap (same example); the key chunk's smallest block id is at most the
    query chunk's largest (keys come from the same or an earlier block); and when the key chunk
    holds no latent, the two block-id ranges overlap (only latents are read across blocks).
    `meta` must be padded to a multiple of both chunks.
    """
    b, t = meta.segment_ids.shape
    real = meta.segment_ids != 0
    big = jnp.iinfo(jnp.int32).max

    def summary(chunk):
        def per(a, fill, op):
            return op(jnp.where(real, a, fill).reshape(b, t // chunk, chunk), axis=-1)

        return dict(
            any=jnp.any(real.reshape(b, t // chunk, chunk), axis=-1),
            seg_lo=per(meta.segment_ids, big, jnp.min),
            seg_hi=per(meta.segment_ids, -1, jnp.max),
            blk_lo=per(meta.block_ids, big, jnp.min),
            blk_hi=per(meta.block_ids, -1, jnp.max),
            latent=jnp.any((meta.roles == LATENT).reshape(b, t // chunk, chunk), axis=-1),
        )

    q, k = summary(q_chunk), summary(k_chunk)
    qx = lambda a: a[:, :, None]  # noqa: E731
    kx = lambda a: a[:, None, :]  # noqa: E731
    possible = (
        qx(q["any"]) & kx(k["any"])
        & (qx(q["seg_hi"]) >= kx(k["seg_lo"])) & (kx(k["seg_hi"]) >= qx(q["seg_lo"]))
        & (kx(k["blk_lo"]) <= qx(q["blk_hi"]))
        & (kx(k["latent"]) | (kx(k["blk_hi"]) >= qx(q["blk_lo"])))
    )  # fmt: skip
    nq, nk = t // q_chunk, t // k_chunk
    causal = (jnp.arange(nk)[None, :] * k_chunk) <= (jnp.arange(nq)[:, None] + 1) * q_chunk - 1
    return causal & jnp.any(possible, axis=0)


def grc_mask(
    segment_ids: Int[Array, "b t"],
    block_ids: Int[Array, "b t"],
    roles: Int[Array, "b t"],
    memory_mode: MemoryMode,
) -> Bool[Array, "b t t"]:
    """Dense boolean mask `[b, query, key]` of the GRC visibility rule for packed rows."""
    t = segment_ids.shape[-1]
    idx = jnp.arange(t)
    in_comp = compression_block_flags(segment_ids, block_ids, roles)
    q = lambda a: a[:, :, None]  # noqa: E731
    k = lambda a: a[:, None, :]  # noqa: E731
    return visible(
        q(segment_ids),
        q(block_ids),
        q(roles),
        idx[None, :, None],
        q(in_comp),
        k(segment_ids),
        k(block_ids),
        k(roles),
        idx[None, None, :],
        memory_mode,
    )
