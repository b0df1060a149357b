"""Converters between our JSONL schema and formats users hold (`grc_jax/data/formats.py`): BEIR
directories both ways, sentence-transformers pairs / triplets, and one-line errors on bad input."""

import json

import pytest

from grc_jax.cli import main
from grc_jax.core.errors import DataError, MissingPathError
from grc_jax.data.formats import (
    beir_to_records,
    doc_id,
    read_beir,
    read_records,
    read_st,
    records_to_beir,
    write_beir,
    write_jsonl,
)
from grc_jax.data.schema import BadLineError, parse_record
from tests.data.conftest import read_jsonl

RECORDS = [
    {"query": "what is a cat", "positive": "A cat is a small animal.",
     "negatives": ["A dog barks.", "A car drives."]},
    {"query": "what is a dog", "positive": "A dog barks.",
     "negatives": ["A cat is a small animal."]},
    {"query": "what is a boat", "positive": "A boat floats."},
]  # fmt: skip


QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t1\nq2\td3\t1\nq3\td1\t0\n"


def _beir(tmp_path, qrels=QRELS):
    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    docs = [("d1", "Cats", "Cats purr."), ("d2", "", "Kittens are young cats."),
            ("d3", "Dogs", "Dogs bark."), ("d4", "Birds", "Birds sing."),
            ("d5", "Fish", "Fish swim.")]  # fmt: skip
    (root / "corpus.jsonl").write_text(
        "".join(
            json.dumps({"_id": i, "title": t, "text": x, "metadata": {}}) + "\n" for i, t, x in docs
        )  # fmt: skip
    )
    (root / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n"
                for q, t in [("q1", "cats?"), ("q2", "dogs?"), ("q3", "none?"), ("q4", "x")])
    )  # fmt: skip
    (root / "qrels" / "test.tsv").write_text(qrels)
    return root


# ---------------------------------------------------------------------------------- BEIR


def test_read_beir(tmp_path):
    corpus, queries, qrels = read_beir(_beir(tmp_path), "test")
    assert corpus["d1"] == "Cats\nCats purr." and corpus["d2"] == "Kittens are young cats."
    assert queries == {"q1": "cats?", "q2": "dogs?", "q3": "none?"}  # q4 has no judgements
    assert qrels == {"q1": {"d1": 2, "d2": 1}, "q2": {"d3": 1}, "q3": {"d1": 0}}


def test_beir_to_records_one_per_relevant_doc_with_seeded_negatives(tmp_path):
    corpus, queries, qrels = read_beir(_beir(tmp_path), "test")
    recs = beir_to_records(corpus, queries, qrels)
    assert recs == [
        {"query": "cats?", "positive": "Cats\nCats purr."},  # the higher score first
        {"query": "cats?", "positive": "Kittens are young cats."},
        {"query": "dogs?", "positive": "Dogs\nDogs bark."},
    ]  # q3's only judgement has score 0: no record
    a = beir_to_records(corpus, queries, qrels, negatives=2, seed=3)
    assert a == beir_to_records(corpus, queries, qrels, negatives=2, seed=3)
    for rec, q in zip(a, ["q1", "q1", "q2"]):
        judged = {corpus[d] for d in qrels[q]}
        assert len(rec["negatives"]) == 2 and not judged & set(rec["negatives"])


def test_beir_round_trip(tmp_path):
    corpus, queries, qrels = records_to_beir(RECORDS)
    assert len(corpus) == 4  # positives and negatives, each text once
    assert corpus[doc_id("A dog barks.")] == "A dog barks."
    write_beir(tmp_path / "b", corpus, queries, qrels, split="dev")
    header = (tmp_path / "b" / "qrels" / "dev.tsv").read_text().splitlines()[0]
    assert header == "query-id\tcorpus-id\tscore"
    c2, q2, r2 = read_beir(tmp_path / "b", "dev")
    assert (c2, q2, r2) == (corpus, queries, qrels)
    back = beir_to_records(c2, q2, r2)
    assert [(r["query"], r["positive"]) for r in back] == [
        (r["query"], r["positive"]) for r in RECORDS
    ]


def test_beir_bad_input_names_file_and_line(tmp_path):
    with pytest.raises(MissingPathError, match="no such BEIR directory"):
        read_beir(tmp_path / "nope")
    root = _beir(tmp_path)
    with pytest.raises(MissingPathError, match="dev.tsv"):
        read_beir(root, "dev")
    (root / "qrels" / "test.tsv").write_text("q1\td1\t1\nq1\td2\tmany\n")  # no header: fine
    with pytest.raises(DataError, match=r"test.tsv:2: score 'many' is not a number"):
        read_beir(root)
    (root / "qrels" / "test.tsv").write_text("q1\td1\n")
    with pytest.raises(DataError, match=r"test.tsv:1: expected 'query-id<TAB>corpus-id<TAB>score'"):
        read_beir(root)
    (root / "qrels" / "test.tsv").write_text("q1\td9\t1\n")
    with pytest.raises(DataError, match=r"names document\(s\) \['d9'\]"):
        read_beir(root)
    (root / "qrels" / "test.tsv").write_text("q9\td1\t1\n")
    with pytest.raises(DataError, match="query id 'q9' is not in queries.jsonl"):
        read_beir(root)
    (root / "qrels" / "test.tsv").write_text("q1\td1\t1\n")
    with (root / "corpus.jsonl").open("a") as f:
        f.write('{"title": "no id"}\n')
    with pytest.raises(DataError, match=r"corpus.jsonl:6: expected a JSON object with '_id'"):
        read_beir(root)


# ------------------------------------------------------------------- sentence-transformers


def test_st_forms(tmp_path):
    path = tmp_path / "st.jsonl"
    lines = [
        ["a1", "p1"],
        ["a2", "p2", "n2"],
        {"anchor": "a3", "positive": "p3"},
        {"anchor": "a4", "positive": "p4", "negative": "n4"},
        {"query": "a5", "pos": ["p5", "p5b"], "neg": ["n5", "n5b"]},
        {"sentence1": "a6", "sentence2": "p6"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert read_st(path) == [
        {"query": "a1", "positive": "p1"},
        {"query": "a2", "positive": "p2", "negatives": ["n2"]},
        {"query": "a3", "positive": "p3"},
        {"query": "a4", "positive": "p4", "negatives": ["n4"]},
        {"query": "a5", "positive": "p5", "negatives": ["n5", "n5b"]},
        {"query": "a5", "positive": "p5b", "negatives": ["n5", "n5b"]},
        {"query": "a6", "positive": "p6"},
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        ('["only one"]', "got a list of 1 items"),
        ('["a", "b", "c", "d"]', "got a list of 4 items"),
        ('["a", ""]', "'positive' must be a non-empty string"),
        ('{"anchor": "a", "positive": "p", "label": 1}', r"unexpected key\(s\) \['label'\]"),
        ('{"query": "q", "pos": []}', "'pos' must not be an empty list"),
        ('{"query": "q", "pos": ["p", 3]}', r"'pos\[1\]' must be a non-empty string"),
        ('{"text": "x"}', r"got keys \['text'\]"),
        ('"just a string"', "got str"),
        ("{not json", "not valid JSON"),
    ],
)
def test_st_bad_lines_name_file_line_and_the_forms(tmp_path, line, message):
    path = tmp_path / "st.jsonl"
    path.write_text('["fine", "pair"]\n' + line + "\n")
    with pytest.raises(DataError, match=message) as info:
        read_st(path)
    assert str(info.value).startswith(f"{path}:2: ")
    if "JSON" not in message and "must" not in message:
        assert "[anchor, positive]" in str(info.value)


# ---------------------------------------------------------------------------------- JSONL


def test_write_jsonl_checks_every_record(tmp_path):
    path = tmp_path / "out" / "x.jsonl"
    assert write_jsonl(path, RECORDS) == 3
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        parse_record(line, f"x:{n}")
    assert read_records(path) == RECORDS
    with pytest.raises(BadLineError, match=r"x.jsonl:2: field 'positive'"):
        write_jsonl(path, [RECORDS[0], {"query": "q", "positive": " "}])


# ---------------------------------------------------------------------------------- the CLI


def test_cli_converters(tmp_path, capsys):
    st = tmp_path / "st.jsonl"
    st.write_text('["a1", "p1", "n1"]\n{"anchor": "a2", "positive": "p2"}\n')
    ours = tmp_path / "ours.jsonl"
    assert main(["data", "from-st", str(st), "--out", str(ours)]) == 0
    assert read_jsonl(ours) == [{"query": "a1", "positive": "p1", "negatives": ["n1"]},
                                {"query": "a2", "positive": "p2"}]  # fmt: skip
    assert main(["data", "to-beir", str(ours), "--out", str(tmp_path / "beir")]) == 0
    back = tmp_path / "back.jsonl"
    assert main(["data", "from-beir", str(tmp_path / "beir"), "--out", str(back),
                 "--negatives", "1"]) == 0  # fmt: skip
    recs = read_jsonl(back)
    assert [(r["query"], r["positive"]) for r in recs] == [("a1", "p1"), ("a2", "p2")]
    assert all(len(r["negatives"]) == 1 for r in recs)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["from-st", "{d}/missing.jsonl", "--out", "{d}/o.jsonl"], "missing.jsonl: no such file"),
        (["from-st", "{d}/bad.jsonl", "--out", "{d}/o.jsonl"], "bad.jsonl:1: expected"),
        (["to-beir", "{d}/bad.jsonl", "--out", "{d}/b"], "bad.jsonl:1: expected a JSON object"),
        (["from-beir", "{d}/nope", "--out", "{d}/o.jsonl"], "no such BEIR directory"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, capsys, args, message):
    (tmp_path / "bad.jsonl").write_text('["one"]\n')
    capsys.readouterr()
    assert main(["data", *[a.format(d=tmp_path) for a in args]]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("grc data: error: ") and message in err[0], err
