"""Ranking metrics of a retrieval run, computed by `ir_measures` (trec_eval's definitions, as BEIR
and MTEB report them): nDCG@10, recall@1, recall@10 and MRR@10.

A run is `{query id: {doc id: score}}` over the top `RUN_DEPTH` documents of each query. Two rules
are ours and applied before the library sees the run:

- ties are broken against the relevant documents (among equal scores, non-relevant documents rank
  first), so a model whose embeddings all coincide scores as badly as it ranks, instead of by
  trec_eval's order of document ids; scores handed to the library are then strictly decreasing;
- a document whose id equals the query's id is not ranked (BEIR's `ignore_identical_ids`: in
  some sets, e.g. ArguAna and Quora, queries are also in the corpus).
"""

from __future__ import annotations

from collections.abc import Sequence

import ir_measures
import numpy as np
from ir_measures import RR, R, nDCG

RUN_DEPTH = 100
# Our metric names -> ir_measures measures (trec_eval: ndcg_cut_10, recall_1, recall_10,
# recip_rank over the top 10; relevance is a qrels score >= 1, nDCG gains are the scores).
MEASURES = {"ndcg@10": nDCG @ 10, "recall@1": R @ 1, "recall@10": R @ 10, "mrr@10": RR @ 10}


def rank(scores: np.ndarray, relevant: np.ndarray, depth: int = RUN_DEPTH) -> np.ndarray:
    """Indices of the top `depth` documents by score, best first; among equal scores the
    non-relevant ones first, then document order.

    Args:
      scores: `[n_docs]` float scores of one query.
      relevant: `[n_docs]` bool, the query's relevant documents.
    """
    order = np.lexsort((np.arange(len(scores)), relevant.astype(np.int8), -scores))
    return order[:depth]


def run_from_scores(
    scores: np.ndarray,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    qrels: dict[str, dict[str, int]],
    depth: int = RUN_DEPTH,
) -> dict[str, dict[str, float]]:
    """A run from a dense score matrix `[n_queries, n_docs]` (ties against relevant documents,
    a document with the query's own id left out)."""
    scores = np.asarray(scores, np.float64)
    if scores.shape != (len(query_ids), len(doc_ids)):
        raise ValueError(f"scores {scores.shape} vs {len(query_ids)} queries x {len(doc_ids)} docs")
    position = {d: i for i, d in enumerate(doc_ids)}
    run = {}
    for qi, qid in enumerate(query_ids):
        row = scores[qi].copy()
        if qid in position:
            row[position[qid]] = -np.inf
        relevant = np.zeros(len(doc_ids), bool)
        for d, s in qrels.get(qid, {}).items():
            if s > 0 and d in position:
                relevant[position[d]] = True
        top = [i for i in rank(row, relevant, depth) if np.isfinite(row[i])]
        # Strictly decreasing scores carry our order into the library unchanged.
        run[qid] = {doc_ids[i]: float(len(top) - r) for r, i in enumerate(top)}
    return run


def retrieval_metrics(
    qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]
) -> dict[str, float]:
    """Mean over the run's queries of each metric of `MEASURES` (a query with no retrieved
    document scores 0)."""
    qids = list(run)
    judged = {q: qrels[q] for q in qids if q in qrels}
    totals = dict.fromkeys(MEASURES, 0.0)
    by_measure = {m: name for name, m in MEASURES.items()}
    for metric in ir_measures.iter_calc(list(MEASURES.values()), judged, run):
        totals[by_measure[metric.measure]] += float(metric.value)
    n = max(len(qids), 1)
    return {name: totals[name] / n for name in MEASURES}


def dense_metrics(
    query_emb: np.ndarray,
    doc_emb: np.ndarray,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    qrels: dict[str, dict[str, int]],
) -> dict[str, float]:
    """Exact inner-product search of every query over every document, then `retrieval_metrics`."""
    scores = np.asarray(query_emb, np.float32) @ np.asarray(doc_emb, np.float32).T
    return retrieval_metrics(qrels, run_from_scores(scores, query_ids, doc_ids, qrels))
