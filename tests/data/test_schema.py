"""The JSONL record schema: defaults, and one error per kind of bad line naming file:line, field."""

import json

import pytest

from grc_jax.data.schema import FIELDS, BadLineError, GRCRecord, parse_record

WHERE = "data/train.jsonl:17"


def test_minimal_record_gets_defaults():
    r = parse_record('{"query": "which city ?", "positive": "velora is a city ."}', WHERE)
    assert r == GRCRecord(query="which city ?", positive="velora is a city .")
    assert r.reasoning == "" and r.answer == ""
    assert r.negatives == () and r.compress_target is None


def test_full_record_from_bytes():
    obj = {
        "query": "q",
        "positive": "p",
        "reasoning": "1 + 2 = 3",
        "answer": "3",
        "negatives": ["n1", "n2"],
        "compress_target": "t",
    }
    assert set(obj) == set(FIELDS)
    r = parse_record(json.dumps(obj).encode() + b"\n", WHERE)
    assert r == GRCRecord("q", "p", "1 + 2 = 3", "3", ("n1", "n2"), "t")
    assert isinstance(r.negatives, tuple)


_DROP = object()  # a field to leave out


def _line(**fields) -> str:
    base = {"query": "q", "positive": "p"}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not _DROP})


BAD_LINES = {
    "invalid json": ('{"query": "q", "positive": ', "JSON"),
    "invalid utf-8": (b'{"query": "\xff\xfe", "positive": "p"}', "JSON"),
    "not an object": ('["q", "p"]', "object"),
    "a string": ('"q"', "object"),
    "unknown field": (_line(reasoning_="typo"), "reasoning_"),
    "missing query": (_line(query=_DROP), "'query'"),
    "empty query": (_line(query="  "), "'query'"),
    "non-string query": (_line(query=3), "'query'"),
    "missing positive": (_line(positive=_DROP), "'positive'"),
    "empty positive": (_line(positive=""), "'positive'"),
    "non-string reasoning": (_line(reasoning=["1 + 2 = 3"]), "'reasoning'"),
    "non-string answer": (_line(answer=3), "'answer'"),
    "non-string compress_target": (_line(compress_target=1), "'compress_target'"),
    "negatives not a list": (_line(negatives="n1"), "'negatives'"),
    "negatives with an empty string": (_line(negatives=["n1", " "]), "'negatives'"),
    "negatives with a number": (_line(negatives=["n1", 2]), "'negatives'"),
    "empty compress_target": (_line(compress_target=""), "'compress_target'"),
    "blank compress_target": (_line(compress_target=" \t"), "'compress_target'"),
}


@pytest.mark.parametrize("line, names", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_bad_line_names_file_line_and_field(line, names):
    with pytest.raises(BadLineError) as info:
        parse_record(line, WHERE)
    message = str(info.value)
    assert message.startswith(f"{WHERE}: "), message
    assert names in message, message
    assert isinstance(info.value, ValueError)
