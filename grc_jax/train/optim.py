"""AdamW with warmup + cosine decay, global-norm clipping and a weight-decay mask.

No weight decay on norms, biases, the latent table or the temperature: only matrices (kernels,
embeddings, projection, LoRA factors) decay. With `train.freeze_base` only the latent table and
the embedding head train (and LoRA factors when `train.lora_rank > 0`).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from grc_jax.core.config import TrainConfig
from grc_jax.core.trees import path_names
from grc_jax.model.params import is_adapter_leaf


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.learning_rate,
        warmup_steps=tc.warmup_steps,
        decay_steps=max(tc.steps, tc.warmup_steps + 1),
        end_value=tc.learning_rate * tc.min_lr_ratio,
    )


# Leaf names that are weight matrices (Dense kernels, the token embedding, the embedding head's
# projection, LoRA factors). Norm scales, biases (2-D `[heads, head_dim]` here, so rank is not a
# usable test), the latent table and the temperature never decay.
_DECAYED = ("kernel", "embed", "projection", "a", "b")


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: weight matrices only (see `_DECAYED`)."""

    def decays(path, leaf):
        names = path_names(path)
        return names[-1] in _DECAYED and "latents" not in names

    return jax.tree_util.tree_map_with_path(decays, params)


def trainable_labels(params: Any, tc: TrainConfig) -> Any:
    """'train' or 'frozen' per leaf (`train.freeze_base` freezes all but latents, head, LoRA)."""

    def label(path, leaf):
        names = path_names(path)
        if not tc.freeze_base and tc.lora_rank == 0:
            return "train"
        return "train" if is_adapter_leaf(names) else "frozen"

    return jax.tree_util.tree_map_with_path(label, params)


def trainable_mask(params: Any, tc: TrainConfig) -> Any | None:
    """A pytree of bools like `params` (True: the leaf trains), or None when every leaf trains."""
    labels = trainable_labels(params, tc)
    if all(v == "train" for v in jax.tree.leaves(labels)):
        return None
    return jax.tree.map(lambda v: v == "train", labels)


def make_optimizer(tc: TrainConfig, params: Any) -> optax.GradientTransformation:
    tx = optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(
            lr_schedule(tc), b1=0.9, b2=0.95, weight_decay=tc.weight_decay, mask=decay_mask
        ),
    )
    labels = trainable_labels(params, tc)
    if all(v == "train" for v in jax.tree.leaves(labels)):
        return tx
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
