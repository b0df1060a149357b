"""BEIR directories and JSONL splits as corpus / queries / qrels (read by grc_jax.data.formats);
bad directories stop `grc eval` with one line naming the file."""

import json

import pytest

from grc_jax.cli import main
from grc_jax.core.errors import DataError, MissingPathError
from grc_jax.data.formats import doc_id
from grc_jax.eval.datasets import from_jsonl, load_retrieval_set, read_beir
from tests.eval.fixtures import write_beir


@pytest.fixture
def beir(tmp_path):
    return write_beir(tmp_path / "beir")


def test_read_beir(beir):
    with (beir / "corpus.jsonl").open("a") as f:
        f.write(json.dumps({"_id": "d7", "title": "", "text": "  "}) + "\n")  # empty: left out
    data = read_beir(beir, "test")
    assert data.name == "beir:beir/test"
    assert list(data.corpus) == ["d1", "d2", "d3", "d4", "d5", "d6"]  # d7 is empty: left out
    assert data.corpus["d1"] == "velora\nvelora is a city . its population is 42 thousand ."
    assert data.corpus["d4"] == "nothfar is a river . its length is 89 km ."  # no title
    assert list(data.queries) == ["q1", "q2", "q3"]  # q4 has no qrels: dropped, as BEIR does
    assert data.qrels["q2"] == {"d3": 2, "d4": 0}
    assert data.relevant("q2") == ["d3"]  # a score of 0 is judged, not relevant
    small = data.subset(limit=2, max_corpus=3)
    assert list(small.queries) == ["q1", "q2"]
    assert list(small.corpus) == ["d1", "d3", "d4"]  # the judged documents first, then fill
    assert list(data.subset(limit=1, max_corpus=3).corpus) == ["d1", "d2", "d3"]


def test_jsonl_split_becomes_corpus_queries_qrels(tmp_path):
    records = [
        {"query": "q one", "positive": "doc a", "negatives": ["doc b", "doc c"]},
        {"query": "q two", "positive": "doc b", "negatives": ["doc a"]},
        {"query": "q three", "positive": "doc d"},
    ]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = from_jsonl(path)
    a, b, c, d = (doc_id(t) for t in ("doc a", "doc b", "doc c", "doc d"))  # the data layer's ids
    assert data.corpus == {a: "doc a", b: "doc b", c: "doc c", d: "doc d"}
    assert data.queries == {"q1": "q one", "q2": "q two", "q3": "q three"}
    assert data.qrels == {"q1": {a: 1}, "q2": {b: 1}, "q3": {d: 1}}
    assert data.negatives == {"q1": [b, c], "q2": [a], "q3": []}
    assert load_retrieval_set(data=str(path)).corpus == data.corpus


def _line(path, n, text):
    lines = path.read_text().splitlines()
    lines[n - 1] = text
    path.write_text("\n".join(lines) + "\n")


def _only_blank_query_judged(d):
    _line(d / "queries.jsonl", 1, '{"_id": "q9", "text": " "}')
    (d / "qrels/test.tsv").write_text("query-id\tcorpus-id\tscore\nq9\td1\t1\n")


BAD = [
    # (what to break, error type, words of the message)
    (lambda d: (d / "corpus.jsonl").unlink(), MissingPathError, ["corpus.jsonl", "no such file"]),
    (lambda d: _line(d / "corpus.jsonl", 2, "{oops"), DataError,
     ["corpus.jsonl:2", "not valid JSON"]),
    (lambda d: _line(d / "queries.jsonl", 3, '{"text": "no id"}'), DataError,
     ["queries.jsonl:3", "'_id'"]),
    (lambda d: _line(d / "corpus.jsonl", 3, '{"_id": "d3", "text": 7}'), DataError,
     ["corpus.jsonl:3", "'text' must be a string"]),
    (lambda d: (d / "qrels/test.tsv").rename(d / "qrels/dev.tsv"), MissingPathError,
     ["test.tsv", "qrels for this split"]),
    (lambda d: _line(d / "qrels/test.tsv", 3, "q2\td3\thigh"), DataError,
     ["test.tsv:3", "'high' is not a number"]),
    (lambda d: _line(d / "qrels/test.tsv", 2, "q1 d1 1"), DataError,
     ["test.tsv:2", "query-id<TAB>corpus-id<TAB>score"]),
    (lambda d: _line(d / "qrels/test.tsv", 2, "zz\td1\t1"), DataError,
     ["test.tsv", "'zz' is not in queries.jsonl"]),
    (lambda d: _line(d / "qrels/test.tsv", 2, "q1\tnope\t1"), DataError,
     ["test.tsv", "['nope']", "not in corpus.jsonl"]),
    (lambda d: _only_blank_query_judged(d), DataError, ["no (non-empty) query"]),
]  # fmt: skip


@pytest.mark.parametrize("breaks, kind, words", BAD, ids=[w[-1] for *_, w in BAD])
def test_bad_beir_directories_are_named(beir, breaks, kind, words):
    breaks(beir)
    with pytest.raises(kind) as info:
        read_beir(beir, "test")
    for w in words:
        assert w in str(info.value)


def test_missing_and_wrong_paths(tmp_path):
    with pytest.raises(MissingPathError, match="no such BEIR directory"):
        read_beir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a BEIR one"):
        load_retrieval_set(data=str(tmp_path / "empty"))
    with pytest.raises(MissingPathError):
        load_retrieval_set(data=str(tmp_path / "missing.jsonl"))


def test_grc_eval_names_a_bad_beir_directory_in_one_line(beir, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.yaml").write_text("{}\n")  # the data is read before the model
    (beir / "queries.jsonl").write_text("[1, 2]\n")
    capsys.readouterr()
    assert main(["eval", str(model), "--beir", str(beir)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"grc eval: error: {beir / 'queries.jsonl'}:1: expected a JSON object with '_id' and text"
    ]
    assert main(["eval", str(tmp_path / "none"), "--beir", str(beir)]) == 2
    assert "not a run directory" in capsys.readouterr().err
