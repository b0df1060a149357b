"""GRC transformer: layers, RoPE, the visibility mask and the full model."""

from grc_jax.model.mask import compression_block_flags, grc_mask, visible
from grc_jax.model.transformer import (
    ModelOutput,
    Transformer,
    abstract_params,
    build_model,
    forward,
    init_params,
    project_logits,
    stack_layers,
    unstack_layers,
)

__all__ = [
    "ModelOutput",
    "Transformer",
    "abstract_params",
    "build_model",
    "compression_block_flags",
    "forward",
    "grc_mask",
    "init_params",
    "project_logits",
    "stack_layers",
    "unstack_layers",
    "visible",
]
