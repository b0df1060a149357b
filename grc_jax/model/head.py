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
    """Per example slot `s` (segment id `s + 1`): mean or last of block 0's latent hidden states."""
    latent0 = (roles == LATENT) & (block_ids == 0)
    slot = segment_ids[:, :, None] == jnp.arange(1, num_slots + 1)[None, None, :]  # [b, t, s]
    member = (slot & latent0[:, :, None]).astype(jnp.float32)
    if pooling == "last":
        # One-hot of the highest index among each slot's block-0 latents.
        idx = jnp.arange(hidden.shape[1], dtype=jnp.float32)[None, :, None]
        last = jnp.max(member * (idx + 1), axis=1, keepdims=True) - 1
        member = member * (idx == last)
    elif pooling != "mean":
        raise ConfigError(f"grc.pooling: expected 'mean' or 'last', got {pooling!r}")
    counts = jnp.maximum(jnp.sum(member, axis=1), 1.0)  # [b, s]
    summed = jnp.einsum("bts,btd->bsd", member, hidden.astype(jnp.float32))
    return summed / counts[..., None]


def embed_from_pooled(head: HeadParams, pooled: Float[Array, "*b d"]) -> Float[Array, "*b p"]:
    """Optional projection, then L2 normalisation."""
    if head.projection is not None:
        pooled = pooled @ head.projection
    return pooled * jax.lax.rsqrt(jnp.sum(pooled * pooled, axis=-1, keepdims=True) + 1e-12)


def temperature(head: HeadParams, grc: GRCConfig) -> Array:
    t = jnp.exp(head.log_temperature)
    return t if grc.learnable_temperature else jax.lax.stop_gradient(t)
