"""The GRC decoder: a Llama / Qwen2 / Qwen3 transformer whose LATENT slots read a latent table.

Used purely functionally: `params = init_params(cfg, grc, rng)`, then
`forward(params, cfg, grc, batch)` (or `model.apply({"params": params}, ...)`).
At LATENT slots (`roles == LATENT`) `tokens` holds the latent index k in [0, K): the slot's input is
row k of the latent table instead of a vocabulary embedding (DESIGN.md section 1).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from grc_jax.core.batch import Rows
from grc_jax.core.config import GRCConfig, ModelConfig
from grc_jax.core.roles import LATENT
from grc_jax.core.sharding import constrain
from grc_jax.model.layers import DecoderLayer, RMSNorm, _init, compute_dtype
from grc_jax.model.mask import grc_mask
from grc_jax.model.rope import inverse_frequencies, rope_angles

_REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@flax.struct.dataclass
class ModelOutput:
    """logits `[b, t, V]` (float32), final-norm hidden states `[b, t, d]`, optional per-layer KV.

    `kv` is `(k, v)`, each `[n_layers, b, t, n_kv_heads, head_dim]`; keys are RoPE-rotated at the
    token's position (what attention used), so a latent memory is canonicalised by rotating its
    keys back by the position of its first latent.
    """

    logits: Float[Array, "b t v"]
    hidden: Float[Array, "b t d"]
    kv: tuple[Array, Array] | None = None


class Transformer(nn.Module):
    cfg: ModelConfig
    num_latents: int
    memory_mode: str = "independent"

    def _layer_cls(self, return_kv: bool):
        cfg = self.cfg
        layer = DecoderLayer
        if cfg.remat_policy != "none":
            layer = nn.remat(
                layer, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers
            )
        return layer

    @nn.compact
    def __call__(
        self,
        tokens: Int[Array, "b t"],
        segment_ids: Int[Array, "b t"],
        block_ids: Int[Array, "b t"],
        roles: Int[Array, "b t"],
        positions: Int[Array, "b t"],
        return_kv: bool = False,
    ) -> ModelOutput:
        cfg = self.cfg
        dtype = compute_dtype(cfg)
        embedding = self.param(
            "embed",
            _init(cfg.init_std, ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model),
            jnp.float32,
        )
        latents = self.param(
            "latents",
            _init(cfg.init_std, ("latents", "embed")),
            (self.num_latents, cfg.d_model),
            jnp.float32,
        )
        is_latent = roles == LATENT
        tok_emb = jnp.take(embedding, jnp.where(is_latent, 0, tokens), axis=0)
        lat_emb = jnp.take(
            latents, jnp.clip(jnp.where(is_latent, tokens, 0), 0, self.num_latents - 1), axis=0
        )
        x = jnp.where(is_latent[..., None], lat_emb, tok_emb).astype(dtype)
        x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))

        mask = grc_mask(segment_ids, block_ids, roles, self.memory_mode)
        cos, sin = rope_angles(positions, inverse_frequencies(cfg))

        layer_cls = self._layer_cls(return_kv)
        if cfg.scan_layers:
            stack = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, kv = stack(cfg, return_kv, name="layers")(x, mask, cos, sin)
        else:
            kvs = []
            for i in range(cfg.n_layers):
                x, layer_kv = layer_cls(cfg, return_kv, name=f"layers_{i}")(x, mask, cos, sin)
                kvs.append(layer_kv)
            kv = jax.tree.map(lambda *a: jnp.stack(a), *kvs) if return_kv else None

        hidden = RMSNorm(cfg.rms_norm_eps, dtype=dtype, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", hidden, embedding.astype(dtype))
        else:
            logits = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=jnp.float32,
                kernel_init=_init(cfg.init_std, ("embed", "vocab")),
                name="lm_head",
            )(hidden)
        logits = constrain(
            logits.astype(jnp.float32),
            ("activation_batch", "activation_length", "activation_vocab"),
        )
        return ModelOutput(logits=logits, hidden=hidden, kv=kv)


def build_model(cfg: ModelConfig, grc: GRCConfig) -> Transformer:
    return Transformer(cfg=cfg, num_latents=grc.num_latents, memory_mode=grc.memory_mode)


def _dummy_inputs(batch: int = 1, length: int = 8) -> dict[str, Array]:
    z = jnp.zeros((batch, length), jnp.int32)
    return dict(tokens=z, segment_ids=z + 1, block_ids=z, roles=z + 1, positions=z)


def abstract_params(cfg: ModelConfig, grc: GRCConfig) -> tuple[Any, Any]:
    """(shape pytree, logical-axis-names pytree of PartitionSpecs) without allocating params."""
    model = build_model(cfg, grc)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **_dummy_inputs())["params"])
    logical = nn.get_partition_spec(boxed)
    return nn.unbox(boxed), logical


def init_params(cfg: ModelConfig, grc: GRCConfig, rng: jax.Array) -> Any:
    """Random float32 parameters (plain arrays, no partitioning boxes)."""
    model = build_model(cfg, grc)
    return nn.unbox(model.init(rng, **_dummy_inputs())["params"])


def forward(
    params: Any,
    cfg: ModelConfig,
    grc: GRCConfig,
    rows: Rows,
    return_kv: bool = False,
) -> ModelOutput:
    """One forward pass over packed rows (a `Batch` is `Rows` too)."""
    model = build_model(cfg, grc)
    return model.apply(
        {"params": params},
        rows.tokens,
        rows.segment_ids,
        rows.block_ids,
        rows.roles,
        rows.positions,
        return_kv=return_kv,
    )


def stack_layers(params: Any, n_layers: int) -> Any:
    """Per-layer params (`layers_0`, ...) -> the scanned layout (`layers`, leading layer axis)."""
    params = dict(params)
    layers = [params.pop(f"layers_{i}") for i in range(n_layers)]
    params["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    return params


def unstack_layers(params: Any, n_layers: int) -> Any:
    """The scanned layout -> per-layer params (`layers_0`, ...)."""
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(n_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return params
