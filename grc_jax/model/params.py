"""The parameters a GRC run trains: the transformer, the embedding head, optional LoRA factors."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
from jaxtyping import Array

from grc_jax.core.config import Config
from grc_jax.model.head import HeadParams, init_head
from grc_jax.model.lora import init_lora, merge_lora
from grc_jax.model.transformer import init_params


@flax.struct.dataclass(kw_only=True)
class GRCParams:
    """`model`: the transformer's params (Flax's nested dict, scanned or per-layer layout);
    `head`: the embedding head; `lora`: `{kernel path: {"a", "b"}}` factors, or None."""

    # Leaves travel through JAX transforms as tracers, ShapeDtypeStructs, shardings and specs, so
    # construction is not type-checked; the annotations are the contract.
    __no_type_check__ = True

    # Field order is the leaf order (head, lora, model: alphabetical, as the dict of params was):
    # the global-norm clip and the gradient norm sum over leaves in this order, so it fixes the
    # float rounding of a training run.
    head: HeadParams
    lora: dict[str, dict[str, Array]] | None = None
    model: dict[str, Any]

    def merged(self, scanned: bool) -> dict[str, Any]:
        """The transformer params a forward pass uses: LoRA merged into the kernels when present."""
        if self.lora is None:
            return self.model
        return merge_lora(self.model, self.lora, scanned)


def is_adapter_leaf(names: tuple[str, ...]) -> bool:
    """Whether the `GRCParams` leaf at path `names` is trained with `train.freeze_base` (the
    latent table, the embedding head, LoRA factors): the leaves an adapter carries."""
    return names[0] in ("head", "lora") or "latents" in names


def init_grc_params(cfg: Config, rng: jax.Array, model_params: Any | None = None) -> GRCParams:
    """Fresh params; `model_params` (e.g. an imported model) replaces the random transformer."""
    r_model, r_head, r_lora = jax.random.split(rng, 3)
    if model_params is None:
        model_params = init_params(cfg.model, cfg.grc, r_model)
    lora = None
    if cfg.train.lora_rank > 0:
        lora = init_lora(model_params, cfg.train.lora_rank, cfg.model.scan_layers, r_lora)
    head = init_head(cfg.grc, cfg.model.d_model, r_head)
    return GRCParams(model=model_params, head=head, lora=lora)
