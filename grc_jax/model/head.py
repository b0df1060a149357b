"""The embedding head: latent hidden states -> pooled -> (projected) unit-norm embeddings."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from grc_jax.core.config import GRCConfig
from grc_jax.core.errors import ConfigError
from grc_jax.core.roles import LATENT


@flax.struct.dataclass
class HeadParams:
    """The (optionally learned) log temperature of InfoNCE and an optional projection `[d, P]`."""

    # Leaves travel through JAX transforms as tracers, ShapeDtypeStructs, shardings and specs, so
    # construction is not type-checked; the annotations are the contract.
    __no_type_check__ = True

    log_temperature: Float[Array, ""]
    projection: Float[Array, "d p"] | None = None

    @property
    def dim(self) -> int | None:
        """Embedding width when projected, else None (the model width)."""
        return None if self.projection is None else int(self.projection.shape[1])


def init_head(grc: GRCConfig, d_model: int, rng: jax.Array) -> HeadParams:
    projection = None
    if grc.projection_dim is not None:
        projection = jax.random.normal(rng, (d_model, grc.projection_dim)) * d_model**-0.5
    return HeadParams(jnp.log(jnp.float32(grc.temperature)), projection)


def pool_latents(
    hidden: Float[Array, "b t d"],
    segment_ids: Int[Array, "b t"],
    block_ids: Int[Array, "b t"],
    roles: Int[Array, "b t"],
    num_slots: int,
    pooling: str,
) -> Float[Array, "b s d"]:
    """Per example slot `s` (segment id `s + 1`): mean or last of block 0's latent hidden states
    (float32; zeros for a slot without latents)."""
    if pooling not in ("mean", "last"):
        raise ConfigError(f"grc.pooling: expected 'mean' or 'last', got {pooling!r}")
    latent0 = (roles == LATENT) & (block_ids == 0)
    # Slot index of each block-0 latent; every other token gets `num_slots`, out of range, which
    # the segment reductions drop (as they drop segment ids past `num_slots`).
    slot = jnp.where(latent0, segment_ids - 1, num_slots)
    h = hidden.astype(jnp.float32)
    # Per row (vmap), so that the reductions keep the batch axis and a batch sharded over devices
    # stays sharded; a scatter-add over `t` costs O(b t d), not the O(b t s d) of a one-hot matmul.
    if pooling == "mean":
        summed = jax.vmap(lambda x, s: jax.ops.segment_sum(x, s, num_slots))(h, slot)
        ones = latent0.astype(jnp.float32)
        counts = jax.vmap(lambda x, s: jax.ops.segment_sum(x, s, num_slots))(ones, slot)
        return summed / jnp.maximum(counts, 1.0)[..., None]
    index = jnp.broadcast_to(jnp.arange(h.shape[1]), slot.shape)
    last = jax.vmap(lambda x, s: jax.ops.segment_max(x, s, num_slots))(index, slot)  # [b, s]
    found = last >= 0  # an empty slot gets the int32 minimum
    picked = jnp.take_along_axis(h, jnp.where(found, last, 0)[..., None], axis=1)
    return jnp.where(found[..., None], picked, 0.0)


def embed_from_pooled(head: HeadParams, pooled: Float[Array, "*b d"]) -> Float[Array, "*b p"]:
    """Optional projection, then L2 normalisation."""
    if head.projection is not None:
        pooled = pooled @ head.projection
    return pooled * jax.lax.rsqrt(jnp.sum(pooled * pooled, axis=-1, keepdims=True) + 1e-12)


def temperature(head: HeadParams, grc: GRCConfig) -> Array:
    t = jnp.exp(head.log_temperature)
    return t if grc.learnable_temperature else jax.lax.stop_gradient(t)
