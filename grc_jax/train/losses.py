"""The three GRC losses from ONE forward pass (DESIGN.md section 4).

The batch is a `grc_jax.core.batch.Batch` (built by `grc_jax.data.pipeline`): the packed rows, the
next-token `targets`, and `gen_weights` / `comp_weights`, 1.0 where position `t` predicts a `GEN`
token of a consumer block, i.e. a block without latents after a compression block of its example
(`L_comp`), or any other `GEN` token: compression blocks, plain generation examples (`L_gen`);
both tokens in the same block of the same example. Its per-slot fields (`seg_kind`, `seg_group`,
`seg_positive`, `seg_doc`) drive InfoNCE; `seg_doc` drops duplicate copies of a positive from
the negatives.

Normalisation: `L_gen` and `L_comp` are sums of token cross-entropies divided by the number of
target tokens of that kind in the GLOBAL batch (every target token weighs the same, whatever its
row or device); `L_rep` is the mean over the global batch's queries of the InfoNCE loss against
every document of the global batch (`grc_jax.train.infonce`: only the query and document slots
are scored, each device scoring its own queries).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from grc_jax.core.batch import Batch
from grc_jax.core.config import GRCConfig, ModelConfig
from grc_jax.model import forward, project_logits
from grc_jax.model.head import HeadParams, embed_from_pooled, pool_latents, temperature
from grc_jax.model.params import GRCParams
from grc_jax.train.infonce import info_nce


def token_cross_entropy(
    logits: Float[Array, "b t v"], targets: Int[Array, "b t"], weights: Float[Array, "b t"]
) -> tuple[Array, Array]:
    """(sum of weighted next-token cross-entropies, sum of weights), in float32."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((logz - picked) * weights), jnp.sum(weights)


# Positions per row in a chunk of `target_token_losses`: the LM head of a chunk is one
# `[b, 128, V]` matmul (with fewer rows per matmul, XLA on CPU runs the LM head less efficiently).
TARGET_CHUNK = 128


def target_token_losses(
    logits_fn: Callable[[Array], Array],
    hidden: Float[Array, "b t d"],
    targets: Int[Array, "b t"],
    gen_weights: Float[Array, "b t"],
    comp_weights: Float[Array, "b t"],
    chunk: int = TARGET_CHUNK,
) -> tuple[Array, Array]:
    """(gen sum, comp sum) of weighted next-token cross-entropies, with logits computed only
    where a weight is non-zero: the same sums as `token_cross_entropy` over all logits.

    Each row's positions are sorted so that its targets come first (stable), then taken in chunks
    of `chunk` positions; a chunk past the largest per-row target count is skipped (`lax.cond`),
    so the LM head, the softmax and their backward run on about as many positions as there are
    targets (GEN tokens are about 40% of a GRC batch) instead of all of them.
    """
    b, t = targets.shape
    pad = -t % chunk
    is_target = (gen_weights != 0) | (comp_weights != 0)
    order = jnp.argsort(~is_target, axis=1, stable=True)
    needed = jnp.max(jnp.sum(is_target, axis=1))

    def take(x):
        x = jnp.take_along_axis(x, order.reshape(b, t, *([1] * (x.ndim - 2))), axis=1)
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))

    h, tg, gw, cw = take(hidden), take(targets), take(gen_weights), take(comp_weights)

    def one_chunk(h_c, tg_c, gw_c, cw_c):
        logits = logits_fn(h_c)
        logz = jax.nn.logsumexp(logits, axis=-1)
        ce = logz - jnp.take_along_axis(logits, tg_c[..., None], axis=-1)[..., 0]
        return jnp.sum(ce * gw_c), jnp.sum(ce * cw_c)

    def skip(h_c, tg_c, gw_c, cw_c):
        return jnp.float32(0), jnp.float32(0)

    gen_sum = comp_sum = jnp.float32(0)
    for start in range(0, t + pad, chunk):
        part = [x[:, start : start + chunk] for x in (h, tg, gw, cw)]
        g, c = jax.lax.cond(start < needed, one_chunk, skip, *part)
        gen_sum, comp_sum = gen_sum + g, comp_sum + c
    return gen_sum, comp_sum


def token_loss_sums(
    model_params: Any, model_cfg: ModelConfig, grc: GRCConfig, out: Any, batch: Any,
    logits_at: str = "all",
) -> tuple[Array, Array]:  # fmt: skip
    """(gen sum, comp sum) of a forward pass's token losses: from its logits at every position
    (`logits_at="all"`), or computing logits only at the target positions (`"targets"`,
    `target_token_losses`; the same sums, float rounding aside)."""
    if logits_at == "targets":
        return target_token_losses(
            lambda h: project_logits(model_params, model_cfg, grc, h),
            out.hidden, batch.targets, batch.gen_weights, batch.comp_weights,
        )  # fmt: skip
    gen_sum, _ = token_cross_entropy(out.logits, batch.targets, batch.gen_weights)
    comp_sum, _ = token_cross_entropy(out.logits, batch.targets, batch.comp_weights)
    return gen_sum, comp_sum


def slot_embeddings(head: HeadParams, hidden, batch, grc: GRCConfig) -> Float[Array, "n p"]:
    """Normalised embeddings of every example slot of the batch, flattened to `[B * S, P]`."""
    num_slots = batch.seg_kind.shape[1]
    pooled = pool_latents(
        hidden, batch.segment_ids, batch.block_ids, batch.roles, num_slots, grc.pooling
    )
    emb = embed_from_pooled(head, pooled)
    return emb.reshape(-1, emb.shape[-1])


def _flat(x: Array) -> Array:
    return x.reshape(-1)


def rep_loss_from_embeddings(emb, head, batch, grc: GRCConfig) -> tuple[Array, Array]:
    return info_nce(
        emb,
        _flat(batch.seg_kind),
        _flat(batch.seg_group),
        _flat(batch.seg_positive),
        _flat(batch.seg_doc),
        temperature(head, grc),
    )


def grc_loss(
    params: GRCParams, model_cfg: ModelConfig, grc: GRCConfig, batch: Batch, logits_at: str = "all"
) -> tuple[Array, dict[str, Array]]:
    """`L = w_gen L_gen + w_rep L_rep + w_comp L_comp` from one `model.apply`; returns (L, metrics).

    `logits_at` (`train.logits_at`): see `token_loss_sums`.
    """
    out = forward(params.model, model_cfg, grc, batch, lora=params.lora)
    gen_sum, comp_sum = token_loss_sums(params.model, model_cfg, grc, out, batch, logits_at)
    gen_n, comp_n = jnp.sum(batch.gen_weights), jnp.sum(batch.comp_weights)
    emb = slot_embeddings(params.head, out.hidden, batch, grc)
    rep_sum, rep_n = rep_loss_from_embeddings(emb, params.head, batch, grc)
    return combine_losses(grc, gen_sum, gen_n, rep_sum, rep_n, comp_sum, comp_n)


def combine_losses(grc: GRCConfig, gen_sum, gen_n, rep_sum, rep_n, comp_sum, comp_n):
    """(total loss, metrics) from the three loss sums and their global counts."""
    l_gen = gen_sum / jnp.maximum(gen_n, 1.0)
    l_comp = comp_sum / jnp.maximum(comp_n, 1.0)
    l_rep = rep_sum / jnp.maximum(rep_n, 1.0)
    w = grc.loss_weights
    total = w.gen * l_gen + w.rep * l_rep + w.comp * l_comp
    metrics = {
        "loss/total": total,
        "loss/gen": l_gen,
        "loss/rep": l_rep,
        "loss/comp": l_comp,
        "count/gen_tokens": gen_n,
        "count/comp_tokens": comp_n,
        "count/queries": rep_n,
    }
    return total, metrics
