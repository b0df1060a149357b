"""Loss and gradients of the GRC objective, optionally over microbatches (GradCache for L_rep).

With `microbatches > 1` the contrastive loss keeps every negative of the full batch:

1. embed every microbatch without gradients and compute `L_rep` on all embeddings at once, with
   its gradient with respect to the embeddings (and the temperature);
2. re-run each microbatch with gradients on a surrogate `w_gen * gen_sum / N_gen +
   w_comp * comp_sum / N_comp + w_rep * <embeddings, dL_rep/dembeddings>`, whose parameter
   gradient is that microbatch's share of the full-batch gradient, and accumulate.

Token losses are normalised by the full batch's target counts, so the sum over microbatches equals
the full-batch loss exactly (up to float summation order).

With a frozen base (`trainable`, from `grc_jax.train.optim.trainable_mask`) only the trainable
leaves are differentiated: the frozen ones are constants of the differentiated function, so their
weight gradients (a full-size matmul per projection, and the tied LM head's) are never computed.
Their entries in the returned gradients are zeros.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from grc_jax.core.batch import Batch
from grc_jax.core.config import GRCConfig, ModelConfig
from grc_jax.core.errors import ConfigError
from grc_jax.model import forward
from grc_jax.model.params import GRCParams
from grc_jax.train.losses import (
    combine_losses,
    grc_loss,
    rep_loss_from_embeddings,
    slot_embeddings,
    token_loss_sums,
)


def split_microbatches(batch: Batch, n: int) -> Batch:
    """`[B, ...] -> [n, B // n, ...]`, microbatch i = rows i, i + n, ... (strided, so a batch
    sharded over devices gives every device a share of every microbatch)."""

    def split(x):
        if x.shape[0] % n:
            raise ConfigError(f"train.microbatches={n} does not divide the batch size {x.shape[0]}")
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _is_none(x: Any) -> bool:
    return x is None


def partition(params: Any, trainable: Any) -> tuple[Any, Any]:
    """(trainable part, frozen part) of `params`: two trees of its structure, each with None where
    the other holds the leaf. `trainable` is a pytree of bools with `params`' structure."""
    train = jax.tree.map(lambda x, t: x if t else None, params, trainable)
    frozen = jax.tree.map(lambda x, t: None if t else x, params, trainable)
    return train, frozen


def combine(part: Any, rest: Any) -> Any:
    """The leaves of `part`, and of `rest` where `part` has None (inverse of `partition`)."""
    return jax.tree.map(lambda a, b: b if a is None else a, part, rest, is_leaf=_is_none)


def loss_and_grads(
    params: GRCParams,
    model_cfg: ModelConfig,
    grc: GRCConfig,
    batch: Batch,
    microbatches: int = 1,
    trainable: Any | None = None,
    logits_at: str = "all",
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """(total loss, metrics, gradients) of `grc_loss`; microbatched with GradCache when > 1.

    `trainable`: None (every leaf trains) or a pytree of bools like `params`; frozen leaves are
    not differentiated and get zero gradients. `logits_at`: see `losses.token_loss_sums`.
    """
    args = (model_cfg, grc, batch, microbatches, logits_at)
    if trainable is None or all(jax.tree.leaves(trainable)):
        return _loss_and_grads(params, *args, lambda p: p)
    train, frozen = partition(params, trainable)
    loss, metrics, grads = _loss_and_grads(train, *args, lambda p: combine(p, frozen))
    zeros = jax.tree.map(jnp.zeros_like, frozen)  # never read by the optimizer: XLA drops them
    return loss, metrics, combine(grads, zeros)


def _loss_and_grads(
    params: Any,
    model_cfg: ModelConfig,
    grc: GRCConfig,
    batch: Batch,
    microbatches: int,
    logits_at: str,
    full: Callable[[Any], GRCParams],
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """`loss_and_grads` with respect to `params`, which `full` turns into the `GRCParams` (the
    identity, or `combine` with the frozen part)."""
    if microbatches == 1:
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: grc_loss(full(p), model_cfg, grc, batch, logits_at), has_aux=True
        )(params)
        return loss, metrics, grads

    w = grc.loss_weights
    gen_n = jnp.maximum(jnp.sum(batch.gen_weights), 1.0)
    comp_n = jnp.maximum(jnp.sum(batch.comp_weights), 1.0)
    mbs = split_microbatches(batch, microbatches)

    whole = full(params)

    # Pass 1: embeddings of every microbatch, no gradients kept.
    def embed(mb):
        out = forward(whole.model, model_cfg, grc, mb, lora=whole.lora)
        return slot_embeddings(whole.head, out.hidden, mb, grc)

    emb = jax.lax.stop_gradient(jax.lax.map(embed, mbs))  # [n, slots_per_mb, P]
    # Back to the batch's own row order (microbatch i holds rows i, i + n, ...), where the slots
    # of each device's rows are one contiguous block: InfoNCE splits the slots over the devices.
    rows, slots = batch.seg_kind.shape
    n_mb, rows_mb = microbatches, rows // microbatches

    def to_rows(e):  # [n, rows_mb * S, P] -> [B * S, P]
        return jnp.swapaxes(e.reshape(n_mb, rows_mb, slots, -1), 0, 1).reshape(-1, e.shape[-1])

    def rep_fn(emb_flat, head):
        rep_sum, rep_n = rep_loss_from_embeddings(emb_flat, head, batch, grc)
        return rep_sum / jnp.maximum(rep_n, 1.0), rep_n

    (l_rep, rep_n), (g_emb, g_head) = jax.value_and_grad(rep_fn, argnums=(0, 1), has_aux=True)(
        to_rows(emb), whole.head
    )
    g_emb = jnp.swapaxes(g_emb.reshape(rows_mb, n_mb, slots, -1), 0, 1).reshape(emb.shape)

    # Pass 2: re-forward each microbatch with gradients on its surrogate loss.
    def surrogate(p, mb, g):
        p = full(p)
        out = forward(p.model, model_cfg, grc, mb, lora=p.lora)
        gen_sum, comp_sum = token_loss_sums(p.model, model_cfg, grc, out, mb, logits_at)
        e = slot_embeddings(p.head, out.hidden, mb, grc)
        value = w.gen * gen_sum / gen_n + w.comp * comp_sum / comp_n + w.rep * jnp.sum(e * g)
        return value, (gen_sum, comp_sum)

    def body(acc, xs):
        mb, g = xs
        grads, gen_acc, comp_acc = acc
        (_, (gen_sum, comp_sum)), gr = jax.value_and_grad(surrogate, has_aux=True)(params, mb, g)
        grads = jax.tree.map(jnp.add, grads, gr)
        return (grads, gen_acc + gen_sum, comp_acc + comp_sum), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, gen_sum, comp_sum), _ = jax.lax.scan(
        body, (zeros, jnp.float32(0), jnp.float32(0)), (mbs, g_emb)
    )
    # The temperature's gradient comes from pass 1 only (it does not enter the embeddings). The
    # head always trains, so `grads.head` is whole also when `params` is a trainable part.
    grads = grads.replace(head=jax.tree.map(lambda a, b: a + w.rep * b, grads.head, g_head))
    loss, metrics = combine_losses(
        grc, gen_sum, jnp.sum(batch.gen_weights), l_rep * rep_n, rep_n, comp_sum,
        jnp.sum(batch.comp_weights),
    )  # fmt: skip
    return loss, metrics, grads
