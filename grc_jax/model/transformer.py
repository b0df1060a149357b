"""The GRC decoder: a Llama / Qwen2 / Qwen3 transformer whose LATENT slots read a latent table.

Used purely functionally: `params = init_params(cfg, grc, rng)`, then
`forward(params, cfg, grc, rows)` (or `model.apply({"params": params}, ...)`).
At LATENT slots (`roles == LATENT`) `tokens` holds the latent index k in [0, K): the slot's input is
row k of the latent table instead of a vocabulary embedding (DESIGN.md section 1).

`Transformer.__call__` is the training / full-sequence pass with the GRC mask; `Transformer.decode`
runs the same embedding, layers and logits head over new tokens whose attention is supplied by the
caller (the inference engine's hybrid paged attention over latent memories and text pages).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
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
from grc_jax.model.flash import FlashLayout, flash_layout
from grc_jax.model.layers import DecoderLayer, RMSNorm, _init, compute_dtype
from grc_jax.model.lora import lora_collection
from grc_jax.model.mask import TokenMeta, grc_mask
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

    logits: Float[Array, "b t v"] | None  # None when the model was built with_logits=False
    hidden: Float[Array, "b t d"]
    kv: tuple[Array, Array] | None = None


class Transformer(nn.Module):
    cfg: ModelConfig
    num_latents: int
    memory_mode: str = "independent"
    return_kv: bool = False  # __call__ also returns every layer's (k, v)
    with_logits: bool = True  # False: __call__ skips the LM head (embedding, compression)

    def setup(self):
        cfg = self.cfg
        dtype = compute_dtype(cfg)
        # Params directly in this scope are created in this order (embed, then latents): their
        # initial values depend on it.
        self.embed = self.param(
            "embed", _init(cfg.init_std, ("vocab", "embed")), (cfg.vocab_size, cfg.d_model),
            jnp.float32,
        )  # fmt: skip
        self.latents = self.param(
            "latents", _init(cfg.init_std, ("latents", "embed")), (self.num_latents, cfg.d_model),
            jnp.float32,
        )  # fmt: skip
        layer = DecoderLayer
        if cfg.remat_policy != "none":
            layer = nn.remat(
                layer, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers
            )
        if cfg.scan_layers:
            self.layers = nn.scan(
                layer,
                variable_axes={"params": 0, "lora": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.return_kv)
        else:
            self.layers = [layer(cfg, self.return_kv) for _ in range(cfg.n_layers)]
        self.final_norm = RMSNorm(cfg.rms_norm_eps, dtype=dtype)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                kernel_init=_init(cfg.init_std, ("embed", "vocab")),
            )  # fmt: skip

    def embed_inputs(
        self, tokens: Int[Array, "b t"], roles: Int[Array, "b t"]
    ) -> Float[Array, "b t d"]:
        """Vocabulary embeddings, or latent-table rows at LATENT slots, in the compute dtype."""
        is_latent = roles == LATENT
        tok_emb = jnp.take(self.embed, jnp.where(is_latent, 0, tokens), axis=0)
        lat_emb = jnp.take(
            self.latents, jnp.clip(jnp.where(is_latent, tokens, 0), 0, self.num_latents - 1), axis=0
        )
        x = jnp.where(is_latent[..., None], lat_emb, tok_emb).astype(compute_dtype(self.cfg))
        return constrain(x, ("activation_batch", "activation_length", "activation_embed"))

    def head(self, x: Float[Array, "b t d"]) -> tuple[Float[Array, "b t v"], Array]:
        """(float32 logits, final-norm hidden states) of the last layer's output."""
        hidden = self.final_norm(x)
        return self.logits(hidden), hidden

    def logits(self, hidden: Float[Array, "b t d"]) -> Float[Array, "b t v"]:
        """The LM head: float32 logits of final-norm hidden states (any `t`: a loss may take the
        hidden states of the positions it needs, see `project_logits`)."""
        if self.cfg.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", hidden, self.embed.astype(hidden.dtype))
        else:
            logits = self.lm_head(hidden)
        return constrain(
            logits.astype(jnp.float32),
            ("activation_batch", "activation_length", "activation_vocab"),
        )

    def attention_inputs(self, segment_ids, block_ids, roles) -> Array | FlashLayout:
        """What every layer's attention reads: the dense mask (`attention_impl="dense"`) or the
        per-token metadata and tile map of flash attention (computed once, not per layer)."""
        if self.cfg.attention_impl == "dense":
            return grc_mask(segment_ids, block_ids, roles, self.memory_mode)
        meta = TokenMeta.build(segment_ids, block_ids, roles, self.memory_mode)
        return flash_layout(meta, self.cfg.attention_chunk)

    def __call__(
        self,
        tokens: Int[Array, "b t"],
        segment_ids: Int[Array, "b t"],
        block_ids: Int[Array, "b t"],
        roles: Int[Array, "b t"],
        positions: Int[Array, "b t"],
    ) -> ModelOutput:
        x = self.embed_inputs(tokens, roles)
        mask = self.attention_inputs(segment_ids, block_ids, roles)
        cos, sin = rope_angles(positions, inverse_frequencies(self.cfg))
        if self.cfg.scan_layers:
            x, kv = self.layers(x, mask, cos, sin)
        else:
            kvs = []
            for layer in self.layers:
                x, layer_kv = layer(x, mask, cos, sin)
                kvs.append(layer_kv)
            kv = jax.tree.map(lambda *a: jnp.stack(a), *kvs) if self.return_kv else None
        if not self.with_logits:
            return ModelOutput(logits=None, hidden=self.final_norm(x), kv=kv)
        logits, hidden = self.head(x)
        return ModelOutput(logits=logits, hidden=hidden, kv=kv)

    def decode(
        self,
        tokens: Int[Array, "b c"],
        roles: Int[Array, "b c"],
        positions: Int[Array, "b c"],
        attend: Callable[[int, Array, Array, Array, Any], tuple[Array, Any]],
        state: Any,
        logits_index: Int[Array, " b"] | None = None,
    ) -> tuple[ModelOutput, Any]:
        """`c` new tokens per sequence whose attention is `attend(layer, q, k, v, state)`.

        `attend` returns the attended values `[b, c, H, D]` and the new `state` (e.g. a KV cache
        it wrote the chunk's k / v into); `state` is threaded through the layers in order. The
        output's `kv` holds the chunk's own (k, v), `[L, b, c, G, D]`. Needs the per-layer
        parameter layout (`unstack_layers` a scanned checkpoint first). With `logits_index`, the
        LM head runs only at that position of each sequence (logits and hidden `[b, 1, ...]`:
        what sampling needs, without the head's cost on every prompt token).
        """
        if self.cfg.scan_layers:
            raise ValueError(
                "Transformer.decode runs layer by layer: build it with scan_layers=False and "
                "unstack_layers() the params"
            )
        x = self.embed_inputs(tokens, roles)
        cos, sin = rope_angles(positions, inverse_frequencies(self.cfg))
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            x, (k, v), state = layer.decode(x, cos, sin, functools.partial(attend, i), state)
            ks.append(k)
            vs.append(v)
        if logits_index is None:
            logits, hidden = self.head(x)
        else:
            hidden = jnp.take_along_axis(self.final_norm(x), logits_index[:, None, None], axis=1)
            logits = self.logits(hidden)
        return ModelOutput(logits=logits, hidden=hidden, kv=(jnp.stack(ks), jnp.stack(vs))), state


def build_model(
    cfg: ModelConfig, grc: GRCConfig, return_kv: bool = False, with_logits: bool = True
) -> Transformer:
    return Transformer(
        cfg=cfg, num_latents=grc.num_latents, memory_mode=grc.memory_mode, return_kv=return_kv,
        with_logits=with_logits,
    )  # fmt: skip


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
    lora: dict[str, Any] | None = None,
    with_logits: bool = True,
) -> ModelOutput:
    """One forward pass over packed rows (a `Batch` is `Rows` too).

    `lora`: flat LoRA factors (`GRCParams.lora`) applied unmerged, `x W + (x a) b` (training);
    `forward(merge_lora(params, lora, ...), ...)` computes the same function. `with_logits=False`
    leaves out the LM head (output `logits` is None): embedding and compression need only the
    hidden states (and k / v).
    """
    model = build_model(cfg, grc, return_kv, with_logits)
    variables = {"params": params}
    if lora:
        variables["lora"] = lora_collection(lora)
    return model.apply(
        variables, rows.tokens, rows.segment_ids, rows.block_ids, rows.roles, rows.positions
    )


def project_logits(
    params: Any, cfg: ModelConfig, grc: GRCConfig, hidden: Float[Array, "b t d"]
) -> Float[Array, "b t v"]:
    """`Transformer.logits`: the LM head applied to final-norm hidden states (`forward`'s
    `hidden`, or a selection of its positions)."""
    return build_model(cfg, grc).apply({"params": params}, hidden, method=Transformer.logits)


def decode(
    params: Any,
    cfg: ModelConfig,
    grc: GRCConfig,
    tokens: Int[Array, "b c"],
    roles: Int[Array, "b c"],
    positions: Int[Array, "b c"],
    attend: Callable[[int, Array, Array, Array, Any], tuple[Array, Any]],
    state: Any,
    logits_index: Int[Array, " b"] | None = None,
) -> tuple[ModelOutput, Any]:
    """`Transformer.decode` with per-layer `params` (see there)."""
    return build_model(cfg, grc).apply(
        {"params": params}, tokens, roles, positions, attend, state, logits_index,
        method=Transformer.decode,
    )  # fmt: skip


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
