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
every document of the global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from grc_jax.core.batch import Batch
from grc_jax.core.config import GRCConfig, ModelConfig
from grc_jax.core.roles import DOC, QUERY
from grc_jax.model import forward
from grc_jax.model.head import HeadParams, embed_from_pooled, pool_latents, temperature
from grc_jax.model.params import GRCParams

_NEG = -1e30


def token_cross_entropy(
    logits: Float[Array, "b t v"], targets: Int[Array, "b t"], weights: Float[Array, "b t"]
) -> tuple[Array, Array]:
    """(sum of weighted next-token cross-entropies, sum of weights), in float32."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((logz - picked) * weights), jnp.sum(weights)


def info_nce(
    emb: Float[Array, "n p"],
    kind: Int[Array, " n"],
    group: Int[Array, " n"],
    positive: Int[Array, " n"],
    doc: Int[Array, " n"],
    temp: Array,
) -> tuple[Array, Array]:
    """(sum over queries of InfoNCE, number of queries) over flattened example slots.

    Each query is scored against every document slot; its target is the document of its own group
    flagged positive. Other copies of the same document text are removed from its negatives.
    A query without a positive in the batch is ignored.
    """
    is_q = kind == QUERY
    is_d = kind == DOC
    scores = (emb @ emb.T) / temp  # [query slot, doc slot]
    pos = is_d[None, :] & (positive[None, :] == 1) & (group[None, :] == group[:, None])
    duplicate = is_d[None, :] & (doc[None, :] == doc[:, None]) & ~pos
    allowed = is_d[None, :] & ~duplicate
    scores = jnp.where(allowed, scores, _NEG)
    logz = jax.nn.logsumexp(scores, axis=-1)
    has_pos = is_q & jnp.any(pos, axis=-1)
    pos_score = jnp.max(jnp.where(pos, scores, _NEG), axis=-1)
    per_query = jnp.where(has_pos, logz - pos_score, 0.0)
    return jnp.sum(per_query), jnp.sum(has_pos.astype(jnp.float32))


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
    params: GRCParams, model_cfg: ModelConfig, grc: GRCConfig, batch: Batch
) -> tuple[Array, dict[str, Array]]:
    """`L = w_gen L_gen + w_rep L_rep + w_comp L_comp` from one `model.apply`; returns (L, metrics).
    """
    out = forward(params.merged(model_cfg.scan_layers), model_cfg, grc, batch)
    gen_sum, gen_n = token_cross_entropy(out.logits, batch.targets, batch.gen_weights)
    comp_sum, comp_n = token_cross_entropy(out.logits, batch.targets, batch.comp_weights)
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
