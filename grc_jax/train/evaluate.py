"""Held-out evaluation of the three GRC tasks (`grc eval`, and periodically during training).

- retrieval: every held-out query against the held-out corpus (all positives and negatives of the
  split), nDCG@10 and recall@1/@10, with the bare query `[TEXT][LATENT]` and with self-reasoning
  (the model first generates its reasoning greedily, then the latents read it);
- compression: teacher-forced token accuracy of reconstructing each corpus document from its latent
  memory alone (a consumer block after `[TEXT doc][LATENT]`; the mask lets it see only latents);
- generation: exact match of the final answer parsed from greedy generation after the query.

Generation here recomputes the full forward each step over a fixed-length buffer (one compile, no
KV cache): simple and exact, fine for evaluation of small models; the paged engine is for serving.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grc_jax.core.batch import Rows
from grc_jax.core.config import Config
from grc_jax.core.roles import GEN, TEXT
from grc_jax.data.layout import gen, latents, one_per_row, text
from grc_jax.data.schema import GRCRecord
from grc_jax.data.tokenizer import Tokenizer
from grc_jax.model import forward
from grc_jax.model.head import embed_from_pooled, pool_latents


class Evaluator:
    def __init__(self, cfg: Config, tok: Tokenizer, records: list[GRCRecord], batch_size: int = 64):
        self.cfg, self.tok, self.records, self.bs = cfg, tok, records, batch_size
        corpus: dict[str, int] = {}
        for r in records:
            for d in (r.positive, *r.negatives):
                corpus.setdefault(d, len(corpus))
        self.corpus = list(corpus)
        self.gold = np.array([corpus[r.positive] for r in records])
        self.max_new = max(
            len(tok.encode(self._target(r))) + 2 for r in records
        )  # reasoning + answer + eos
        m, g = cfg.model, cfg.grc

        def fwd(params, batch):
            return forward(params.merged(m.scan_layers), m, g, batch)

        def embed(params, batch):
            out = fwd(params, batch)
            pooled = pool_latents(
                out.hidden, batch.segment_ids, batch.block_ids, batch.roles, 1, g.pooling
            )
            return embed_from_pooled(params.head, pooled[:, 0])

        def next_token(params, batch, last):
            logits = fwd(params, batch).logits
            return jnp.argmax(jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0], -1)

        def comp_acc(params, batch, weights, targets):
            pred = jnp.argmax(fwd(params, batch).logits, -1)
            return jnp.sum((pred == targets) * weights), jnp.sum(weights)

        self._embed = jax.jit(embed)
        self._next = jax.jit(next_token)
        self._comp = jax.jit(comp_acc)

    @staticmethod
    def _target(r: GRCRecord) -> str:
        parts = [r.reasoning] if r.reasoning else []
        if r.answer:
            parts.append(f"answer : {r.answer}")
        return " ".join(parts)

    def _batched(self, items: list, fn) -> list:
        return [fn(items[i : i + self.bs]) for i in range(0, len(items), self.bs)]

    def _embed_examples(self, params, examples) -> np.ndarray:
        k, mode = self.cfg.grc.num_latents, self.cfg.grc.memory_mode

        def run(chunk):
            return np.asarray(self._embed(params, one_per_row(chunk, k, mode)))

        return np.concatenate(self._batched(examples, run))

    def generate(self, params, prompts: list[list[int]], max_new: int) -> list[list[int]]:
        """Greedy continuation of each prompt (a plain causal pass: no latents), up to and
        including EOS (training lays out `reasoning ... eos` before the latents)."""
        outs = []
        for chunk in [prompts[i : i + self.bs] for i in range(0, len(prompts), self.bs)]:
            t = -(-(max(len(p) for p in chunk) + max_new) // 32) * 32
            tokens = np.zeros((len(chunk), t), np.int32)
            lengths = np.array([len(p) for p in chunk])
            for i, p in enumerate(chunk):
                tokens[i, : len(p)] = p
            done = np.zeros(len(chunk), bool)
            for _ in range(max_new):
                valid = np.arange(t)[None, :] < lengths[:, None]
                batch = Rows(
                    tokens=tokens,
                    segment_ids=valid.astype(np.int32),
                    block_ids=np.zeros_like(tokens),
                    roles=np.where(valid, TEXT, 0).astype(np.int32),
                    positions=np.tile(np.arange(t, dtype=np.int32), (len(chunk), 1)),
                )
                nxt = np.asarray(self._next(params, batch, jnp.asarray(lengths - 1)))
                for i in range(len(chunk)):
                    if not done[i]:
                        tokens[i, lengths[i]] = nxt[i]
                        lengths[i] += 1
                        done[i] = nxt[i] == self.tok.eos_id
                if done.all():
                    break
            outs += [[int(x) for x in tokens[i, len(p) : lengths[i]]] for i, p in enumerate(chunk)]
        return outs

    def retrieval(self, query_emb: np.ndarray, doc_emb: np.ndarray) -> dict[str, float]:
        scores = query_emb @ doc_emb.T
        gold_score = scores[np.arange(len(scores)), self.gold]
        # 0-based rank of the gold document; ties count against it (an untrained model whose
        # embeddings all coincide must not score as if it ranked the gold document first).
        rank = np.sum(scores >= gold_score[:, None], axis=1) - 1
        ndcg = np.where(rank < 10, 1.0 / np.log2(rank + 2), 0.0)
        return {
            "ndcg@10": float(ndcg.mean()),
            "recall@1": float(np.mean(rank < 1)),
            "recall@10": float(np.mean(rank < 10)),
        }

    def compression_accuracy(self, params) -> float:
        k, mode, tok = self.cfg.grc.num_latents, self.cfg.grc.memory_mode, self.tok
        hits = total = 0.0
        for chunk in [self.corpus[i : i + self.bs] for i in range(0, len(self.corpus), self.bs)]:
            exs = [
                [
                    [text([tok.bos_id, *tok.encode(d)]), latents(k)],
                    [text([tok.bos_id]), gen([*tok.encode(d), tok.eos_id])],
                ]
                for d in chunk
            ]
            rows = one_per_row(exs, k, mode)
            targets = np.zeros_like(rows.tokens)
            targets[:, :-1] = rows.tokens[:, 1:]
            weights = np.zeros(rows.tokens.shape, np.float32)
            weights[:, :-1] = (rows.roles[:, 1:] == GEN) & (rows.block_ids[:, 1:] == 1)
            h, n = self._comp(params, rows, weights, targets)
            hits, total = hits + float(h), total + float(n)
        return hits / max(total, 1.0)

    def run(self, params: Any) -> dict[str, float]:
        tok, k = self.tok, self.cfg.grc.num_latents
        doc_emb = self._embed_examples(
            params, [[[text([tok.bos_id, *tok.encode(d)]), latents(k)]] for d in self.corpus]
        )
        prompts = [[tok.bos_id, *tok.encode(r.query)] for r in self.records]
        plain = self._embed_examples(params, [[[text(p), latents(k)]] for p in prompts])
        generated = self.generate(params, prompts, self.max_new)
        reasoned = self._embed_examples(
            params,
            [
                [[text(p), gen(g), latents(k)] if g else [text(p), latents(k)]]
                for p, g in zip(prompts, generated)
            ],
        )
        metrics = {f"retrieval/{k_}": v for k_, v in self.retrieval(plain, doc_emb).items()}
        metrics |= {
            f"retrieval_self_reason/{k_}": v for k_, v in self.retrieval(reasoned, doc_emb).items()
        }
        answers = [parse_answer(tok.decode([t for t in g if t != tok.eos_id])) for g in generated]
        exact = answer_exact_match(answers, self.records)
        if exact is not None:  # omitted when no record has an answer (e.g. real text)
            metrics["generation/exact_match"] = exact
        metrics["compression/token_accuracy"] = self.compression_accuracy(params)
        metrics["eval/queries"] = float(len(self.records))
        metrics["eval/corpus"] = float(len(self.corpus))
        assert all(math.isfinite(v) for v in metrics.values())
        return metrics


def answer_exact_match(answers: list[str], records: list[GRCRecord]) -> float | None:
    """The fraction of the records that have an answer whose parsed answer equals it; None when
    no record has one (the figure would be vacuous)."""
    pairs = zip(answers, records, strict=True)
    hits = [a == r.answer.strip() for a, r in pairs if r.answer.strip()]
    return float(np.mean(hits)) if hits else None


def parse_answer(generated: str) -> str:
    """The text after the last `answer :` of a generation (empty when there is none)."""
    marker = "answer :"
    if marker not in generated:
        return ""
    return generated.rsplit(marker, 1)[1].strip()
