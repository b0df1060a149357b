"""Evaluation metrics: ranking with ties, nDCG/recall, answer parsing."""

import numpy as np

from grc_jax.core.config import Config
from grc_jax.data.schema import GRCRecord
from grc_jax.train.evaluate import Evaluator, answer_exact_match, parse_answer
from grc_jax.train.loop import summary_table


class _Tok:
    bos_id, eos_id, pad_id, vocab_size = 2, 3, 0, 64

    def encode(self, text):
        return [4 + (hash(w) % 50) for w in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


def _evaluator():
    records = [
        GRCRecord(query="q1", positive="d1", negatives=("d2",)),
        GRCRecord(query="q2", positive="d2", negatives=("d3",)),
        GRCRecord(query="q3", positive="d3"),
    ]
    return Evaluator(Config(), _Tok(), records)


def test_retrieval_metrics_from_known_ranks():
    ev = _evaluator()
    assert ev.corpus == ["d1", "d2", "d3"] and list(ev.gold) == [0, 1, 2]
    docs = np.eye(3)
    queries = np.array([
        [1.0, 0.0, 0.0],   # gold d1 ranked first
        [0.0, 0.5, 1.0],   # gold d2 ranked second
        [1.0, 1.0, 0.0],   # gold d3 ranked last (third)
    ])  # fmt: skip
    m = ev.retrieval(queries, docs)
    np.testing.assert_allclose(m["recall@1"], 1 / 3)
    np.testing.assert_allclose(m["recall@10"], 1.0)
    want = (1.0 + 1 / np.log2(3) + 1 / np.log2(4)) / 3
    np.testing.assert_allclose(m["ndcg@10"], want)


def test_ties_count_against_the_gold_document():
    ev = _evaluator()
    same = np.ones((3, 4))
    m = ev.retrieval(same, same)
    assert m["recall@1"] == 0.0  # all scores tie: nobody ranks first
    np.testing.assert_allclose(m["ndcg@10"], 1 / np.log2(4))


def test_parse_answer():
    assert parse_answer("40 + 2 = 42 answer : 42") == "42"
    assert parse_answer("answer : 1 answer : 7 ") == "7"
    assert parse_answer("no marker here") == ""


def test_exact_match_counts_only_records_with_an_answer():
    with_answers = [
        GRCRecord(query="q1", positive="d1", answer=" 42 "),
        GRCRecord(query="q2", positive="d2"),  # no answer: left out
        GRCRecord(query="q3", positive="d3", answer="7"),
    ]
    assert answer_exact_match(["42", "anything", "8"], with_answers) == 0.5
    without = [GRCRecord(query="q", positive="d"), GRCRecord(query="r", positive="e")]
    assert answer_exact_match(["", "x"], without) is None


def test_summary_table_leaves_out_metrics_neither_side_has():
    untrained = {"retrieval/ndcg@10": 0.1, "compression/token_accuracy": 0.2}
    final = {"retrieval/ndcg@10": 0.8, "compression/token_accuracy": 0.5}
    table = summary_table(untrained, final)
    assert "generation/exact_match" not in table
    assert "retrieval/ndcg@10" in table and "0.8000" in table
    assert "nan" in summary_table(untrained, {**final, "generation/exact_match": 1.0})
