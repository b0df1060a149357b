"""BEIR directories and JSONL splits as corpus / queries / qrels; bad directories are named."""

import json

import pytest

from grc_jax.cli import main
from grc_jax.core.errors import DataError, MissingPathError
from grc_jax.eval.datasets import BeirFormatError, from_jsonl, load_retrieval_set, read_beir
from tests.eval.fixtures import write_beir


@pytest.fixture
def beir(tmp_path):
    return write_beir(tmp_path / "beir")


def test_read_beir(beir):
    with (beir / "corpus.jsonl").open("a") as f:
        f.write(json.dumps({"_id": "d7", "title": "", "text": "  "}) + "\n")  # empty: left out
    data = read_beir(beir, "test")
    assert data.name == "beir:beir/test"
    assert list(data.corpus) == ["d1", "d2", "d3", "d4", "d5", "d6"]
    assert data.corpus["d1"] == "velora velora is a city . its population is 42 thousand ."
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
    assert data.corpus == {"d0": "doc a", "d1": "doc b", "d2": "doc c", "d3": "doc d"}
    assert data.queries == {"q0": "q one", "q1": "q two", "q2": "q three"}
    assert data.qrels == {"q0": {"d0": 1}, "q1": {"d1": 1}, "q2": {"d3": 1}}
    assert data.negatives == {"q0": ["d1", "d2"], "q1": ["d0"], "q2": []}
    assert load_retrieval_set(data=str(path)).corpus == data.corpus


def _line(path, n, text):
    lines = path.read_text().splitlines()
    lines[n - 1] = text
    path.write_text("\n".join(lines) + "\n")


BAD = [
    # (what to break, error type, words of the message)
    (lambda d: (d / "corpus.jsonl").unlink(), BeirFormatError, ["corpus.jsonl", "missing"]),
    (lambda d: _line(d / "corpus.jsonl", 2, "{oops"), BeirFormatError,
     ["corpus.jsonl:2", "not valid JSON"]),
    (lambda d: _line(d / "queries.jsonl", 3, '{"text": "no id"}'), BeirFormatError,
     ["queries.jsonl:3", "'_id'"]),
    (lambda d: _line(d / "corpus.jsonl", 3, '{"_id": "d1", "text": "again"}'), BeirFormatError,
     ["corpus.jsonl", "'d1'", "more than once"]),
    (lambda d: (d / "qrels/test.tsv").rename(d / "qrels/dev.tsv"), BeirFormatError,
     ["test.tsv", "missing", "dev"]),
    (lambda d: _line(d / "qrels/test.tsv", 1, "q\tc\ts"), BeirFormatError,
     ["test.tsv:1", "header"]),
    (lambda d: _line(d / "qrels/test.tsv", 3, "q2\td3\thigh"), BeirFormatError,
     ["test.tsv:3", "integer", "'high'"]),
    (lambda d: _line(d / "qrels/test.tsv", 2, "q1 d1 1"), BeirFormatError,
     ["test.tsv:2", "3 tab-separated"]),
    (lambda d: (d / "qrels/test.tsv").write_text("query-id\tcorpus-id\tscore\nzz\td1\t1\n"),
     BeirFormatError, ["no query", "qrels/test.tsv"]),
]  # fmt: skip


@pytest.mark.parametrize("breaks, kind, words", BAD, ids=[w[0] + " " + w[1] for *_, w in BAD])
def test_bad_beir_directories_are_named(beir, breaks, kind, words):
    breaks(beir)
    with pytest.raises(kind) as info:
        read_beir(beir, "test")
    for w in words:
        assert w in str(info.value)


def test_missing_and_wrong_paths(tmp_path):
    with pytest.raises(MissingPathError, match="does not exist"):
        read_beir(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BeirFormatError, match="not a directory"):
        read_beir(tmp_path / "file")
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
    assert err == [f"grc eval: error: {beir / 'queries.jsonl'}:1: expected a JSON object, got list"]
    assert main(["eval", str(tmp_path / "none"), "--beir", str(beir)]) == 2
    assert "not a run directory" in capsys.readouterr().err
