"""Transformer building blocks: RMSNorm, grouped-query attention, SwiGLU MLP, decoder layer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from grc_jax.core.config import ModelConfig
from grc_jax.core.constants import MASK_VALUE
from grc_jax.core.sharding import constrain
from grc_jax.model.flash import FlashLayout, flash_attention
from grc_jax.model.flash_tpu import kernel_attention
from grc_jax.model.lora import add_lora
from grc_jax.model.rope import apply_rope


def _init(std: float, names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    return jnp.dtype(cfg.dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as HF does), scale initialised to one."""

    eps: float
    logical_axis: str = "norm"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (self.logical_axis,)),
            (x.shape[-1],),
            jnp.float32,
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale * normed).astype(self.dtype)


class Dense(nn.Dense):
    """`nn.Dense` plus its unmerged LoRA term when the `lora` collection holds one (`add_lora`)."""

    __no_type_check__ = True  # flax's own field annotations are not checkable at runtime

    def __call__(self, x):
        return add_lora(self, x, super().__call__(x))


class DenseGeneral(nn.DenseGeneral):
    """`nn.DenseGeneral` plus its unmerged LoRA term when the `lora` collection holds one."""

    __no_type_check__ = True

    def __call__(self, x):
        return add_lora(self, x, super().__call__(x))


def dot_product_attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s g d"],
    v: Float[Array, "b s g d"],
    mask: Bool[Array, "b t s"],
    layout: str = "token_major",
) -> Float[Array, "b t h d"]:
    """Masked softmax attention with grouped KV heads (`h = g * q_per_kv`); softmax in float32.

    `layout` (`model.attention_layout`) is how the einsums lay out their operands, the same math:
    `token_major` contracts `[b, t, g, q, d]` as it comes; `head_major` first moves the heads in
    front (`[b, g, q * t, d]`), transposing the small q/k/v/output tensors instead of letting XLA
    on CPU copy the `[.., t, s]` scores into other layouts for the backward pass: about half the
    attention time there, at float-rounding differences from `token_major`.
    """
    b, t, h, d = q.shape
    g = k.shape[2]
    qpk = h // g
    if layout == "head_major":
        q_gmd = q.reshape(b, t, g, qpk, d).transpose(0, 2, 3, 1, 4).reshape(b, g, qpk * t, d)
        k_gsd, v_gsd = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        scores = jnp.einsum("bgmd,bgsd->bgms", q_gmd, k_gsd, preferred_element_type=jnp.float32)
        scores = scores.reshape(b, g, qpk, t, -1) * (d**-0.5)
    else:
        q = q.reshape(b, t, g, qpk, d)
        scores = jnp.einsum("btgqd,bsgd->bgqts", q, k, preferred_element_type=jnp.float32)
        scores = scores * (d**-0.5)
    mask = mask[:, None, None, :, :]
    scores = jnp.where(mask, scores, MASK_VALUE)
    # A query that sees no key (padding) attends to nothing: output 0 in every implementation.
    probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), jax.nn.softmax(scores, axis=-1), 0.0)
    probs = probs.astype(v.dtype)
    if layout == "head_major":
        out = jnp.einsum("bgms,bgsd->bgmd", probs.reshape(b, g, qpk * t, -1), v_gsd)
        return out.reshape(b, g, qpk, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
    out = jnp.einsum("bgqts,bsgd->btgqd", probs, v)
    return out.reshape(b, t, h, d)


class Attention(nn.Module):
    """GQA self-attention with optional qkv bias (Qwen2) and per-head q/k RMSNorm (Qwen3).

    `project` (q, k, v at their positions) and `output` are separate methods so that the decode
    path can run the same projections around its own (paged) attention.
    """

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        dtype = compute_dtype(cfg)

        def proj(heads, head_axis):
            return DenseGeneral(
                features=(heads, cfg.head_dim),
                use_bias=cfg.qkv_bias,
                dtype=dtype,
                param_dtype=jnp.float32,
                kernel_init=_init(cfg.init_std, ("embed", head_axis, "head_dim")),
                bias_init=nn.with_logical_partitioning(
                    nn.initializers.zeros, (head_axis, "head_dim")
                ),
            )

        self.q = proj(cfg.n_heads, "heads")
        self.k = proj(cfg.n_kv_heads, "kv_heads")
        self.v = proj(cfg.n_kv_heads, "kv_heads")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.rms_norm_eps, "head_dim", dtype)
            self.k_norm = RMSNorm(cfg.rms_norm_eps, "head_dim", dtype)
        self.o = DenseGeneral(
            features=cfg.d_model,
            axis=(-2, -1),
            use_bias=False,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=_init(cfg.init_std, ("heads", "head_dim", "embed")),
        )

    def project(self, x, cos, sin):
        """q `[b,t,H,D]`, k and v `[b,t,G,D]`; q and k RoPE-rotated at their positions."""
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(
            apply_rope(q, cos, sin),
            ("activation_batch", "activation_length", "activation_heads", "head_dim"),
        )
        k = constrain(
            apply_rope(k, cos, sin),
            ("activation_batch", "activation_length", "activation_kv_heads", "head_dim"),
        )
        v = constrain(
            v, ("activation_batch", "activation_length", "activation_kv_heads", "head_dim")
        )
        return q, k, v

    def output(self, attended):
        return self.o(attended)

    def __call__(self, x, mask, cos, sin):
        """`mask`: the dense `[b, t, t]` mask, or a `FlashLayout` for the flash implementations
        (`Transformer.attention_inputs` builds the one `cfg.attention_impl` asks for)."""
        q, k, v = self.project(x, cos, sin)
        if isinstance(mask, FlashLayout):
            # `kernel`: the Pallas TPU kernel on a TPU, the chunked version (logged once) elsewhere.
            attend = kernel_attention if self.cfg.attention_impl == "kernel" else flash_attention
            attended = attend(q, k, v, mask)
        else:
            attended = dot_product_attention(q, k, v, mask, self.cfg.attention_layout)
        return self.output(attended), (k, v)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dtype = compute_dtype(cfg)

        def dense(name, features, names):
            return Dense(
                features,
                use_bias=False,
                dtype=dtype,
                param_dtype=jnp.float32,
                kernel_init=_init(cfg.init_std, names),
                name=name,
            )

        gate = dense("gate", cfg.d_ff, ("embed", "mlp"))(x)
        up = dense("up", cfg.d_ff, ("embed", "mlp"))(x)
        h = constrain(
            nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp")
        )
        return dense("down", cfg.d_model, ("mlp", "embed"))(h)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer. `__call__` returns the new residual stream and this layer's (k, v)
    (or None); `decode` runs the same layer around attention supplied by the caller."""

    cfg: ModelConfig
    return_kv: bool = False

    def setup(self):
        cfg = self.cfg
        dtype = compute_dtype(cfg)
        self.attn_norm = RMSNorm(cfg.rms_norm_eps, dtype=dtype)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg)

    def _mlp_block(self, x):
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("activation_batch", "activation_length", "activation_embed"))

    def __call__(self, x, mask, cos, sin):
        h, kv = self.attn(self.attn_norm(x), mask, cos, sin)
        return self._mlp_block(x + h), (kv if self.return_kv else None)

    def decode(self, x, cos, sin, attend, state):
        """`attend(q, k, v, state) -> (attended, state)` replaces the masked attention.

        Returns the new residual stream, this layer's (k, v) and the new state.
        """
        q, k, v = self.attn.project(self.attn_norm(x), cos, sin)
        attended, state = attend(q, k, v, state)
        return self._mlp_block(x + self.attn.output(attended)), (k, v), state
