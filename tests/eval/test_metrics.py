"""Ranking metrics (ir_measures) against hand computation on constructed rankings."""

import math

import numpy as np
import pytest

from grc_jax.eval.metrics import dense_metrics, rank, retrieval_metrics, run_from_scores

DOCS = [f"d{i}" for i in range(12)]


def _scores(order: list[int]) -> np.ndarray:
    """Scores over DOCS that rank the documents of `order` first, in that order."""
    s = np.zeros(len(DOCS))
    for r, i in enumerate(order):
        s[i] = 100.0 - r
    rest = [i for i in range(len(DOCS)) if i not in order]
    for r, i in enumerate(rest):
        s[i] = 50.0 - r
    return s


QRELS = {
    "a": {"d2": 1},                    # relevant at rank 3
    "b": {"d5": 2, "d7": 1, "d9": 0},  # graded; d9 judged not relevant
    "c": {"d11": 1},                   # relevant at rank 12: outside every cut-off
}  # fmt: skip


def test_metrics_equal_hand_computation():
    scores = np.stack([
        _scores([0, 1, 2]),           # a: d2 third
        _scores([7, 9, 0, 5]),        # b: d7 first, d9 second, d5 fourth
        _scores([0]),                 # c: d11 last of 12
    ])  # fmt: skip
    scores[2, 11] = -1.0
    m = retrieval_metrics(QRELS, run_from_scores(scores, ["a", "b", "c"], DOCS, QRELS))
    # trec_eval's nDCG: gain = the qrels score, discount log2(rank + 1).
    ndcg_a = (1 / math.log2(4)) / 1.0
    ndcg_b = (1 / math.log2(2) + 2 / math.log2(5)) / (2 / math.log2(2) + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx((ndcg_a + ndcg_b + 0) / 3, abs=1e-4)
    assert m["recall@1"] == pytest.approx((0 + 1 / 2 + 0) / 3)
    assert m["recall@10"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["mrr@10"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    # One figure written out: (0.5 + 0.70749 + 0) / 3.
    assert m["ndcg@10"] == pytest.approx(0.40250, abs=1e-4)


def test_dense_metrics_is_inner_product_search():
    docs = np.eye(3, dtype=np.float32)
    queries = np.array([[1, 0, 0], [0, 0.5, 1], [1, 1, 0]], np.float32)
    qrels = {"q0": {"d0": 1}, "q1": {"d1": 1}, "q2": {"d2": 1}}
    m = dense_metrics(queries, docs, ["q0", "q1", "q2"], ["d0", "d1", "d2"], qrels)
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(4)) / 3, abs=1e-4)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_ties_count_against_the_relevant_document():
    qrels = {"q": {"d0": 1}}
    run = run_from_scores(np.ones((1, 4)), ["q"], ["d0", "d1", "d2", "d3"], qrels)
    assert list(run["q"]) == ["d1", "d2", "d3", "d0"]
    m = retrieval_metrics(qrels, run)
    assert m["recall@1"] == 0.0 and m["mrr@10"] == pytest.approx(1 / 4)
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(5), abs=1e-4)
    order = rank(np.array([1.0, 2.0, 2.0, 0.5]), np.array([False, True, False, False]))
    assert order.tolist() == [2, 1, 0, 3]


def test_a_document_with_the_query_id_is_not_ranked():
    qrels = {"x": {"d1": 1}}
    run = run_from_scores(np.array([[9.0, 1.0, 0.0]]), ["x"], ["x", "d1", "d2"], qrels)
    assert list(run["x"]) == ["d1", "d2"]
    assert retrieval_metrics(qrels, run)["recall@1"] == 1.0


def test_run_depth_and_shape_checks():
    scores = np.arange(150, dtype=np.float64)[None]
    ids = [f"d{i}" for i in range(150)]
    run = run_from_scores(scores, ["q"], ids, {"q": {"d0": 1}})
    assert len(run["q"]) == 100 and next(iter(run["q"])) == "d149"
    with pytest.raises(ValueError, match="scores"):
        run_from_scores(scores, ["q", "r"], ids, {})
