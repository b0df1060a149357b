"""The synthetic corpus: deterministic, disjoint entities per split, correct reasoning, same-kind
hard negatives, and `grc data synth`."""

import re

import pytest

from grc_jax.cli import main
from grc_jax.data.schema import parse_record
from grc_jax.data.synth import HIGH, LOW, number_words, synthesize
from tests.data.conftest import read_jsonl

SPLITS = ("train", "validation", "test")
ARITHMETIC = re.compile(r"^(\d+) ([+-]) (\d+) = (\d+)$")
WORDS = re.compile(r"^([a-z]+(?: [a-z]+)?) = (\d+)$")


def _files(directory):
    return {s: (directory / f"{s}.jsonl").read_bytes() for s in SPLITS}


def _doc_kind(doc: str) -> tuple[str, str]:
    """("place", "city") for "velora is a city . ...", ("person", "lamps") for "nia has 9 lamps"."""
    words = doc.split()
    return ("place", words[3]) if words[1:3] == ["is", "a"] else ("person", words[3])


def _doc_value(doc: str) -> int:
    numbers = [int(w) for w in doc.split() if w.isdigit()]
    assert len(numbers) == 1, doc
    return numbers[0]


@pytest.fixture(scope="module")
def splits(synth_dir):
    return {s: read_jsonl(synth_dir / f"{s}.jsonl") for s in SPLITS}


def test_same_seed_same_bytes_other_seed_differs(tmp_path, synth_dir):
    counts = synthesize(tmp_path / "again", seed=0)
    assert _files(tmp_path / "again") == _files(synth_dir)
    assert counts == {s: len(_files(synth_dir)[s].splitlines()) for s in SPLITS}
    synthesize(tmp_path / "seed1", seed=1)
    other = _files(tmp_path / "seed1")
    assert all(other[s] != _files(synth_dir)[s] for s in SPLITS)


def test_splits_non_empty_and_valid(splits, synth_dir):
    for split, records in splits.items():
        assert len(records) > 0, split
        lines = (synth_dir / f"{split}.jsonl").read_text().splitlines()
        for n, line in enumerate(lines, start=1):
            parse_record(line, f"{split}.jsonl:{n}")  # raises on any schema violation
    assert len(splits["train"]) > len(splits["validation"])


def test_entities_disjoint_between_splits(splits):
    names = {}
    for split, records in splits.items():
        kind_of: dict[str, tuple[str, str]] = {}
        for r in records:
            for doc in (r["positive"], *r["negatives"]):
                name = doc.split()[0]
                assert kind_of.setdefault(name, _doc_kind(doc)) == _doc_kind(doc), (split, name)
        names[split] = set(kind_of)
        assert names[split], split
    assert not names["train"] & names["validation"]
    assert not names["train"] & names["test"]
    assert not names["validation"] & names["test"]


def test_reasoning_is_correct(splits):
    arithmetic = words = 0
    for records in splits.values():
        for r in records:
            v = int(r["answer"])
            assert r["answer"] == str(v) and LOW <= v <= HIGH, r
            assert _doc_value(r["positive"]) == v, r
            kind, what = _doc_kind(r["positive"])
            m = ARITHMETIC.match(r["reasoning"])
            if m:
                arithmetic += 1
                a, op, b = int(m[1]), m[2], int(m[3])
                assert int(m[4]) == v and (a + b if op == "+" else a - b) == v, r
                if kind == "place":
                    assert f" of {a} {op} {b} " in r["query"], r
                else:
                    event = f"gets {b} more" if op == "+" else f"gives away {b} ."
                    assert f" has {a} {what} and {event}" in r["query"], r
            else:
                m = WORDS.match(r["reasoning"])
                assert m and kind == "place", r
                words += 1
                assert int(m[2]) == v and m[1] == number_words(v), r
                assert f" of {m[1]} " in r["query"], r
            # The query never states the number itself: it must be reasoned out.
            assert str(v) not in r["query"].split(), r
    assert arithmetic > 0 and words > 0


def test_query_matches_its_positive(splits):
    for r in splits["train"]:
        kind = _doc_kind(r["positive"])
        if kind[0] == "place":
            assert r["query"].startswith(f"which {kind[1]} "), r
        else:
            name = r["positive"].split()[0]
            assert r["query"].startswith(f"{name} has ") and kind[1] in r["query"], r


def test_negatives_same_kind_and_different(splits):
    with_negatives = 0
    for r in splits["train"] + splits["test"]:
        pos = r["positive"]
        assert len(r["negatives"]) == 2, r
        for neg in r["negatives"]:
            with_negatives += 1
            assert neg != pos
            assert _doc_kind(neg) == _doc_kind(pos), (pos, neg)
            assert _doc_value(neg) != _doc_value(pos), (pos, neg)
        assert len(set(r["negatives"])) == len(r["negatives"])
    assert with_negatives > 0


def test_cli_synth_writes_the_splits(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["data", "synth", "--out", str(out), "--seed", "3", "--negatives", "1"]) == 0
    assert "train" in capsys.readouterr().out
    synthesize(tmp_path / "direct", seed=3, negatives=1)
    assert _files(out) == _files(tmp_path / "direct")
    assert all(len(r["negatives"]) == 1 for r in read_jsonl(out / "train.jsonl"))


def test_number_words():
    assert [number_words(v) for v in (10, 17, 20, 42, 99)] == [
        "ten", "seventeen", "twenty", "forty two", "ninety nine"
    ]  # fmt: skip
    assert len({number_words(v) for v in range(LOW, HIGH + 1)}) == HIGH - LOW + 1
    for bad in (9, 100):
        with pytest.raises(ValueError, match=str(bad)):
            number_words(bad)
