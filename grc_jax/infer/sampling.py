"""Token sampling: greedy, temperature, top-k, top-p (nucleus), seeded."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from grc_jax.core.errors import UsageError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """`temperature=0` is greedy; `top_k=0` and `top_p=1` disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (self.temperature >= 0 and self.temperature < float("inf")):
            raise UsageError(f"temperature: expected a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"top_k: expected >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p: expected a number in (0, 1], got {self.top_p}")


def sample(
    logits: Float[Array, "b v"], key: Array, temperature: Array, top_k: Array, top_p: Array
) -> Array:
    """Next token ids `[b]`; all filters are traced values, so one compile serves every setting."""
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.sort(scaled, axis=-1)[:, ::-1]  # descending; the one sort of the vocabulary
    v = logits.shape[-1]
    kth = jnp.take(order, jnp.clip(top_k - 1, 0, v - 1), axis=-1)[:, None]
    cut = top_k > 0
    scaled = jnp.where(cut & (scaled < kth), -jnp.inf, scaled)
    order = jnp.where(cut & (order < kth), -jnp.inf, order)  # the filtered values, still sorted
    # Nucleus: keep the smallest prefix of the sorted distribution whose mass reaches top_p.
    probs = jax.nn.softmax(order, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted entry
    cutoff = jnp.min(jnp.where(before < top_p, order, jnp.inf), -1)
    scaled = jnp.where(scaled < cutoff[:, None], -jnp.inf, scaled)
    drawn = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


def sample_rows(
    logits: Float[Array, "b v"],
    seeds: Array,
    counts: Array,
    temperature: Array,
    top_k: Array,
    top_p: Array,
) -> Array:
    """`sample` with per-row settings `[b]`: row i draws its `counts[i]`-th token from the stream
    `fold_in(key(seeds[i]), counts[i])`, so what a request draws does not depend on its batch.
    A batch that is all greedy takes the argmax only (no sort of the vocabulary: on a CPU that
    sort costs more than a decode step of a small model)."""

    def one(row, seed, n, t, k, p):
        key = jax.random.fold_in(jax.random.key(seed), n)
        return sample(row[None], key, t, k, p)[0]

    def drawn():
        return jax.vmap(one)(logits, seeds, counts, temperature, top_k, top_p)

    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(jnp.any(temperature > 0), drawn, greedy)
