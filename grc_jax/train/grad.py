"""Loss and gradients of the GRC objective, optionally over microbatches (GradCache for L_rep).

With `microbatches > 1` the contrastive loss keeps every negative of the full batch:

1. embed every microbatch without gradients and compute `L_rep` on all embeddings at once, with
   its gradient with respect to the embeddings (and the temperature);
2. re-run each microbatch with gradients on a surrogate `w_gen * gen_sum / N_gen +
   w_comp * comp_sum / N_comp + w_rep * <embeddings, dL_rep/dembeddings>`, whose parameter
   gradient is that microbatch's share of the full-batch gradient, and accumulate.

Token losses are normalised by the full batch's target counts, so the sum over microbatches equals
the full-batch loss exactly (up to float summation order).
"""

from __future__ import annotations

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
    token_cross_entropy,
)


def split_microbatches(batch: Batch, n: int) -> Batch:
    """`[B, ...] -> [n, B // n, ...]`, microbatch i = rows i, i + n, ... (strided, so a batch
    sharded over devices gives every device a share of every microbatch)."""

    def split(x):
        if x.shape[0] % n:
            raise ConfigError(f"train.microbatches={n} does not divide the batch size {x.shape[0]}")
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def loss_and_grads(
    params: GRCParams,
    model_cfg: ModelConfig,
    grc: GRCConfig,
    batch: Batch,
    microbatches: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """(total loss, metrics, gradients) of `grc_loss`; microbatched with GradCache when > 1."""
    if microbatches == 1:
        (loss, metrics), grads = jax.value_and_grad(grc_loss, has_aux=True)(
            params, model_cfg, grc, batch
        )
        return loss, metrics, grads

    w = grc.loss_weights
    gen_n = jnp.maximum(jnp.sum(batch.gen_weights), 1.0)
    comp_n = jnp.maximum(jnp.sum(batch.comp_weights), 1.0)
    mbs = split_microbatches(batch, microbatches)

    # Pass 1: embeddings of every microbatch, no gradients kept.
    def embed(mb):
        out = forward(params.merged(model_cfg.scan_layers), model_cfg, grc, mb)
        return slot_embeddings(params.head, out.hidden, mb, grc)

    emb = jax.lax.stop_gradient(jax.lax.map(embed, mbs))  # [n, slots_per_mb, P]
    # Slots in microbatch-major order, matching the flattened microbatch metadata below.
    flat_meta = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), mbs)

    def rep_fn(emb_flat, head):
        rep_sum, rep_n = rep_loss_from_embeddings(emb_flat, head, flat_meta, grc)
        return rep_sum / jnp.maximum(rep_n, 1.0), rep_n

    (l_rep, rep_n), (g_emb, g_head) = jax.value_and_grad(rep_fn, argnums=(0, 1), has_aux=True)(
        emb.reshape(-1, emb.shape[-1]), params.head
    )
    g_emb = g_emb.reshape(emb.shape)

    # Pass 2: re-forward each microbatch with gradients on its surrogate loss.
    def surrogate(p, mb, g):
        out = forward(p.merged(model_cfg.scan_layers), model_cfg, grc, mb)
        gen_sum, _ = token_cross_entropy(out.logits, mb.targets, mb.gen_weights)
        comp_sum, _ = token_cross_entropy(out.logits, mb.targets, mb.comp_weights)
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
    # The temperature's gradient comes from pass 1 only (it does not enter the embeddings).
    grads = grads.replace(head=jax.tree.map(lambda a, b: a + w.rep * b, grads.head, g_head))
    loss, metrics = combine_losses(
        grc, gen_sum, jnp.sum(batch.gen_weights), l_rep * rep_n, rep_n, comp_sum,
        jnp.sum(batch.comp_weights),
    )  # fmt: skip
    return loss, metrics, grads
