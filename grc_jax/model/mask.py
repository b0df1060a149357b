"""The GRC visibility rule (DESIGN.md section 2): the one place that decides who sees whom.

Every attention path (dense XLA, Pallas, decode) must agree with `grc_mask`, the dense boolean
reference built here. `visible` is the elementwise rule on broadcast query/key metadata so that a
decode path can evaluate it on cached keys without materialising a square mask.
"""

from __future__ import annotations

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
    """For each token: does its (example, block) contain at least one LATENT token?"""
    same_block = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (
        block_ids[:, :, None] == block_ids[:, None, :]
    )
    return jnp.any(same_block & (roles[:, None, :] == LATENT), axis=-1)


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
