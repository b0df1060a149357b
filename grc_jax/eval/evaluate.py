"""`grc eval`: retrieval, compression, kept generation and RAG of one model on one test set.

Every figure comes from the engine's own modes (`embed`, `compress`, `generate_ids` over
memories) or from the training forward on training layouts (`ForwardScorer`):

- retrieval: each query against the whole corpus by exact inner product of unit-norm embeddings
  (`[TEXT bos text][LATENT x K]`), plain and self-reasoned (DESIGN.md 5); `metrics.py` scores it;
- compression: for held-out documents of at most `max_doc_tokens` tokens, teacher-forced token
  accuracy of `[TEXT bos][GEN doc eos]` in a consumer block that sees only the document's memory,
  and the exact-reconstruction rate: greedy decoding from `[memory][bos]` gives the document;
- generation kept: the causal LM loss of the same documents as plain text, `[TEXT bos][GEN doc]`
  with no latent anywhere;
- RAG: a consumer block `[TEXT bos query][GEN target eos]` (target: the first `rag_target_tokens`
  tokens of the positive document) after the memories of k = 1 (the positive) or 3 documents (the
  positive and 2 distractors, shuffled; memory m at positions [m*K, (m+1)*K)), against the same
  documents as plain text before `bos query` in one TEXT span, and against `[bos query]` alone.

Texts longer than `max_embed_tokens` tokens are cut to that many (decoded back to text, so every
mode reads the same string); RAG documents are cut to `max_doc_tokens`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from grc_jax.core.constants import check_memory_reads
from grc_jax.core.errors import MemoryMismatchError, UsageError
from grc_jax.data.layout import gen, latents, text
from grc_jax.eval.datasets import RetrievalSet
from grc_jax.eval.metrics import dense_metrics
from grc_jax.eval.scoring import ForwardScorer
from grc_jax.infer.engine import Engine, EngineOptions

SECTIONS = ("retrieval", "compression", "generation", "rag")
RAG_MODES = ("memories@1", "memories@3", "text@1", "text@3", "none")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What to evaluate and how much of it."""

    max_doc_tokens: int = 128
    compression_docs: int = 64
    rag_queries: int = 64
    rag_target_tokens: int = 64
    max_reasoning: int = 32
    max_embed_tokens: int = 512
    batch_size: int = 8
    seed: int = 0
    sections: tuple[str, ...] = SECTIONS

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "sections":
                bad = [s for s in value if s not in SECTIONS]
                if bad:
                    raise UsageError(f"sections: unknown {bad}; expected some of {SECTIONS}")
            elif f.name != "seed" and (not isinstance(value, int) or value < 1):
                raise UsageError(f"{f.name}: expected a positive integer, got {value!r}")


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def engine_options(cfg: Any, opts: EvalOptions, query_tokens: int) -> EngineOptions:
    """An engine that holds the longest request the chosen sections make: a self-reasoned query,
    a document reconstructed from its memory, or three documents as text before a query."""
    longest = [1 + query_tokens + opts.max_reasoning]
    if "compression" in opts.sections:
        longest.append(2 + opts.max_doc_tokens)
    if "rag" in opts.sections:
        # + 8 per document: a text cut to n tokens may encode to a few more once decoded.
        longest.append(
            3 * (opts.max_doc_tokens + 8) + 1 + query_tokens + opts.rag_target_tokens + 1
        )
    page = 16
    seq = -(-max(longest) // page) * page
    return EngineOptions(
        page_size=page,
        n_pages=opts.batch_size * (seq // page) + 1,
        max_batch=opts.batch_size,
        max_seq_len=seq,
        max_memories=3,
    )


class Evaluation:
    """One model on one `RetrievalSet`; `run()` returns the JSON-ready result."""

    def __init__(
        self,
        cfg: Any,
        params: Any,
        tok: Any,
        data: RetrievalSet,
        opts: EvalOptions,
        log: Callable[[str], None] = stderr_progress,
    ):
        self.data, self.opts, self.tok, self._log = data, opts, tok, log
        self.t0 = time.perf_counter()
        cut = opts.max_embed_tokens
        self.doc_ids = list(data.corpus)
        self.doc_texts = [self.cut(data.corpus[d], cut) for d in self.doc_ids]
        self.query_ids = list(data.queries)
        self.query_texts = [self.cut(data.queries[q], cut) for q in self.query_ids]
        longest_query = max(len(tok.encode(q)) for q in self.query_texts)
        self.engine = Engine(cfg, params, tok, engine_options(cfg, opts, longest_query))
        self.scorer = ForwardScorer(self.engine, opts.batch_size)
        self._plain: np.ndarray | None = None  # query x doc scores of plain embeddings
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers

    def log(self, message: str) -> None:
        self._log(f"[{time.perf_counter() - self.t0:7.1f}s] {message}")

    def _progress(self, what: str) -> Callable[[int, int], None]:
        every = max(1, self.opts.batch_size * 8)

        def report(done: int, total: int) -> None:
            if done == total or done % every < self.opts.batch_size:
                self.log(f"{what}: {done}/{total}")

        return report

    def cut(self, s: str, n: int) -> str:
        """`s`, or its first `n` tokens decoded back to text if it is longer."""
        ids = self.tok.encode(s)
        return s if len(ids) <= n else self.tok.decode(ids[:n])

    def _padded(self, texts: list[str]) -> list[str]:
        """`texts` filled up with copies of the first to a power of two (at least the batch size,
        at most 64, then multiples of 64): the engine then compiles few batch shapes."""
        n = len(texts)
        size = 64 if n >= 64 else max(self.opts.batch_size, 1 << max(0, n - 1).bit_length())
        return texts + texts[:1] * (-(-n // size) * size - n)

    def embed(self, texts: list[str], what: str, self_reason: bool = False) -> np.ndarray:
        """GRC embeddings `[TEXT bos text][(GEN reasoning)][LATENT x K]` of `texts` (in order;
        computed in order of length, for less padding), `what` names them in the progress."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.engine.head.dim or self.engine.cfg.model.d_model))
        chunk = 256
        for i in range(0, len(order), chunk):
            idx = order[i : i + chunk]
            emb = self.engine.embed(
                self._padded([texts[j] for j in idx]),
                self_reason=self_reason,
                max_reasoning=self.opts.max_reasoning,
            )
            out[idx] = emb[: len(idx)]
            self.log(f"{what}: {min(i + chunk, len(texts))}/{len(texts)}")
        return out.astype(np.float32)

    def pooled(self, texts: list[str], what: str) -> np.ndarray:
        """The plain LM's text embeddings: mean-pooled final hidden states of `[TEXT bos text]`,
        no latents (`ForwardScorer.mean_pooled`)."""
        ids = [self.tok.encode(t) for t in texts]
        return self.scorer.mean_pooled(ids, self._progress(what))

    def _compress(self, texts: list[str]) -> list[Any]:
        """The latent memory of each text (batches padded as in `_padded`)."""
        memories = []
        for i in range(0, len(texts), 64):
            part = texts[i : i + 64]
            memories += [m for m, _ in self.engine.compress(self._padded(part))[: len(part)]]
        return memories

    def _timed(self, name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        out = fn()
        self.timings[name] = round(time.perf_counter() - t, 3)
        return out

    # ------------------------------------------------------------------ sections

    def retrieval(self) -> dict[str, Any]:
        docs = self._timed("embed_corpus", lambda: self.embed(self.doc_texts, "embed corpus"))
        plain = self._timed("embed_queries", lambda: self.embed(self.query_texts, "embed queries"))
        reasoned = self._timed(
            "embed_queries_self_reason",
            lambda: self.embed(self.query_texts, "embed queries (self-reason)", self_reason=True),
        )
        self._plain = plain @ docs.T
        qrels = self.data.qrels
        return {
            "queries": len(self.query_ids),
            "corpus": len(self.doc_ids),
            "max_reasoning": self.opts.max_reasoning,
            "plain": dense_metrics(plain, docs, self.query_ids, self.doc_ids, qrels),
            "self_reason": dense_metrics(reasoned, docs, self.query_ids, self.doc_ids, qrels),
        }

    def _held_out_docs(self) -> list[tuple[str, list[int]]]:
        """(text, token ids) of the first `compression_docs` corpus documents of at most
        `max_doc_tokens` tokens."""
        out = []
        for d in self.doc_ids:
            ids = self.tok.encode(self.data.corpus[d])
            if 0 < len(ids) <= self.opts.max_doc_tokens:
                out.append((self.data.corpus[d], ids))
                if len(out) == self.opts.compression_docs:
                    break
        return out

    def compression(self, held_out: list[tuple[str, list[int]]]) -> dict[str, Any]:
        docs = [ids for _, ids in held_out]
        result: dict[str, Any] = {
            "documents": len(docs),
            "max_doc_tokens": self.opts.max_doc_tokens,
            "token_accuracy": None,
            "exact_reconstruction": None,
        }
        if not docs:
            return result
        tok, k = self.tok, self.engine.K
        examples = [
            [[text([tok.bos_id, *d]), latents(k)], [text([tok.bos_id]), gen([*d, tok.eos_id])]]
            for d in docs
        ]
        stats = self._timed(
            "compression_teacher_forced",
            lambda: self.scorer.teacher_forced(
                examples, [1] * len(docs), self._progress("compression (teacher-forced)")
            ),
        )
        t = time.perf_counter()
        memories = self._compress([t for t, _ in held_out])
        exact = []
        bs = self.opts.batch_size
        order = sorted(range(len(docs)), key=lambda i: len(docs[i]))
        for s in range(0, len(order), bs):
            idx = order[s : s + bs]
            gens = self.engine.generate_ids(
                [[tok.bos_id]] * len(idx),
                [[memories[i]] for i in idx],
                max_new_tokens=max(len(docs[i]) for i in idx) + 1,
            )
            exact += [g.tokens == docs[i] for g, i in zip(gens, idx)]
            self.log(f"compression (greedy from memory): {min(s + bs, len(order))}/{len(order)}")
        self.timings["compression_greedy"] = round(time.perf_counter() - t, 3)
        result["token_accuracy"] = float(stats[:, 0].sum() / stats[:, 1].sum())
        result["exact_reconstruction"] = float(np.mean(exact))
        return result

    def generation(self, held_out: list[tuple[str, list[int]]]) -> dict[str, Any]:
        docs = [ids for _, ids in held_out]
        result: dict[str, Any] = {
            "documents": len(docs),
            "tokens": 0,
            "lm_loss": None,
            "perplexity": None,
        }
        if not docs:
            return result
        bos = self.tok.bos_id
        examples = [[[text([bos]), gen(d)]] for d in docs]
        stats = self._timed(
            "generation_lm_loss",
            lambda: self.scorer.teacher_forced(
                examples, [0] * len(docs), self._progress("plain LM loss")
            ),
        )
        loss = float(stats[:, 2].sum() / stats[:, 1].sum())
        result.update(tokens=int(stats[:, 1].sum()), lm_loss=loss, perplexity=math.exp(loss))
        return result

    def _plain_scores(self) -> np.ndarray:
        if self._plain is None:
            docs = self.embed(self.doc_texts, "embed corpus (RAG distractors)")
            self._plain = self.embed(self.query_texts, "embed queries") @ docs.T
        return self._plain

    def _rag_items(self) -> tuple[list[dict[str, Any]], str]:
        """Per RAG query: query ids, target ids and the 3 documents (positive first)."""
        position = {d: i for i, d in enumerate(self.doc_ids)}
        items, sources = [], set()
        for qi, qid in enumerate(self.query_ids):
            relevant = [d for d in self.data.relevant(qid) if d in position]
            if not relevant:
                continue
            positive = relevant[0]
            distractors = [
                d for d in self.data.negatives.get(qid, []) if d in position and d not in relevant
            ][:2]
            if distractors:
                sources.add("hard negatives")
            if len(distractors) < 2:
                sources.add("top retrieved (plain embeddings)")
                for i in np.argsort(-self._plain_scores()[qi], kind="stable"):
                    d = self.doc_ids[i]
                    if d not in relevant and d not in distractors and d != qid:
                        distractors.append(d)
                    if len(distractors) == 2:
                        break
            items.append(
                {"query": qid, "text": self.query_texts[qi], "docs": [positive, *distractors]}
            )
            if len(items) == self.opts.rag_queries:
                break
        return items, " + ".join(sorted(sources)) or "none"

    def rag(self) -> dict[str, Any]:
        tok, opts = self.tok, self.opts
        items, distractor_source = self._rag_items()
        doc_ids = list(dict.fromkeys(d for it in items for d in it["docs"]))
        doc_text = {d: self.cut(self.data.corpus[d], opts.max_doc_tokens) for d in doc_ids}
        doc_tok = {d: tok.encode(t) for d, t in doc_text.items()}
        rng = np.random.default_rng(opts.seed)
        for it in items:
            it["q"] = [tok.bos_id, *tok.encode(it["text"])]
            it["target"] = doc_tok[it["docs"][0]][: opts.rag_target_tokens]
            order = rng.permutation(len(it["docs"]))
            it["shuffled"] = [it["docs"][i] for i in order]
        mode = self.engine.cfg.grc.memory_mode
        modes: dict[str, Any] = {}
        memories: dict[str, Any] = {}
        if items:
            t = time.perf_counter()
            memories = dict(zip(doc_ids, self._compress([doc_text[d] for d in doc_ids])))
            self.timings["rag_compress"] = round(time.perf_counter() - t, 3)
        for name in RAG_MODES:
            kind, _, n = name.partition("@")
            n = int(n or 0)
            if kind == "memories":
                try:
                    check_memory_reads(mode, n, "rag")
                except MemoryMismatchError as e:  # a recurrent model reads one memory
                    modes[name] = {"token_accuracy": None, "exact_match": None, "note": str(e)}
                    continue
            t = time.perf_counter()
            modes[name] = self._rag_mode(name, items, kind, n, memories, doc_tok)
            self.timings[f"rag_{name}"] = round(time.perf_counter() - t, 3)
        return {
            "queries": len(items),
            "target_tokens": opts.rag_target_tokens,
            "max_doc_tokens": opts.max_doc_tokens,
            "distractors": distractor_source,
            "modes": modes,
        }

    def _rag_mode(self, name: str, items, kind: str, n: int, memories, doc_tok) -> dict[str, Any]:
        if not items:
            return {"token_accuracy": None, "exact_match": None}
        tok, k = self.tok, self.engine.K
        examples, blocks, prompts, mems = [], [], [], []
        for it in items:
            docs = it["shuffled"] if n > 1 else it["docs"][:1]
            consumer = [text(it["q"]), gen([*it["target"], tok.eos_id])]
            if kind == "memories":
                examples.append(
                    [[text([tok.bos_id, *doc_tok[d]]), latents(k)] for d in docs] + [consumer]
                )
                blocks.append(len(docs))
                prompts.append(it["q"])
                mems.append([memories[d] for d in docs])
            elif kind == "text":
                context = [t for d in docs for t in doc_tok[d]]
                examples.append([[text([*context, *it["q"]]), consumer[1]]])
                blocks.append(0)
                prompts.append([*context, *it["q"]])
                mems.append([])
            else:
                examples.append([consumer])
                blocks.append(0)
                prompts.append(it["q"])
                mems.append([])
        stats = self.scorer.teacher_forced(
            examples, blocks, self._progress(f"rag {name} (teacher-forced)")
        )
        exact = []
        bs = self.opts.batch_size
        for s in range(0, len(items), bs):
            sl = slice(s, s + bs)
            targets = [it["target"] for it in items[sl]]
            gens = self.engine.generate_ids(
                prompts[sl], mems[sl], max_new_tokens=max(map(len, targets)) + 1
            )
            exact += [g.tokens == t for g, t in zip(gens, targets)]
        self.log(f"rag {name} (greedy): {len(items)}/{len(items)}")
        return {
            "token_accuracy": float(stats[:, 0].sum() / stats[:, 1].sum()),
            "exact_match": float(np.mean(exact)),
        }

    # ------------------------------------------------------------------ all

    def run(self) -> dict[str, Any]:
        sections = self.opts.sections
        self.log(f"{self.data.name}: {len(self.query_ids)} queries, {len(self.doc_ids)} documents")
        result: dict[str, Any] = dict.fromkeys(SECTIONS)
        if "retrieval" in sections:
            result["retrieval"] = self.retrieval()
        docs = self._held_out_docs() if {"compression", "generation"} & set(sections) else []
        if "compression" in sections:
            result["compression"] = self.compression(docs)
        if "generation" in sections:
            result["generation"] = self.generation(docs)
        if "rag" in sections:
            result["rag"] = self.rag()
        result["timings_s"] = dict(self.timings, total=round(time.perf_counter() - self.t0, 3))
        return result
