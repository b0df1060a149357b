"""Rotary position embeddings (HF "rotate half" layout) with optional Llama-3 frequency scaling."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from grc_jax.core.config import ModelConfig, RopeScalingConfig


def _llama3_scale(inv_freq: np.ndarray, s: RopeScalingConfig) -> np.ndarray:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """`[head_dim // 2]` float32 inverse frequencies, as HF computes them (in float32)."""
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32) / cfg.head_dim
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
    if cfg.rope_scaling is not None:
        inv_freq = _llama3_scale(inv_freq, cfg.rope_scaling)
    return inv_freq


def rope_angles(
    positions: Int[Array, "*b t"], inv_freq: np.ndarray
) -> tuple[Float[Array, "*b t d"], Float[Array, "*b t d"]]:
    """cos and sin tables `[..., t, head_dim]` for explicit (possibly negative) positions."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: Float[Array, "... d"]) -> Float[Array, "... d"]:
    """HF's rotate-half: `[x1, x2] -> [-x2, x1]` on the last axis (the one in grc_jax)."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(
    x: Float[Array, "b t h d"], cos: Float[Array, "b t d"], sin: Float[Array, "b t d"]
) -> Float[Array, "b t h d"]:
    """Rotate `x` (heads on axis 2) by the angles of its positions; computed in float32."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    rotated = rotate_half(x)  # before `x * cos`: the order of the traced ops fixes the backward's
    out = x * cos[:, :, None, :] + rotated * sin[:, :, None, :]  # gradient summation order
    return out.astype(dtype)


def rotate(x: Float[Array, "... d"], angles: Float[Array, "... half"]) -> Float[Array, "... d"]:
    """Rotate `x` by `angles` (one per frequency pair, broadcast against `x`'s leading axes)."""
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)
    return x * cos + rotate_half(x) * sin
