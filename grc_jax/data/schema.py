"""The JSONL schema of GRC training examples, one JSON object per line.

| field | type | required | meaning |
| --- | --- | --- | --- |
| `query` | string | yes | the question / search query |
| `positive` | string | yes | the document the query should retrieve |
| `reasoning` | string | no | reasoning steps the model generates after the query |
| `answer` | string | no | the final answer, generated after the reasoning |
| `negatives` | list of strings | no | hard negative documents |
| `compress_target` | string | no | what the positive's memory must let the model generate |

`compress_target` defaults to the positive's own text (reconstruction).

Unknown fields are an error (a typo such as `reasoning_` would otherwise be silently ignored).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from grc_jax.core.errors import DataError

FIELDS = ("query", "positive", "reasoning", "answer", "negatives", "compress_target")


class BadLineError(DataError):
    """A data line does not follow the schema; the message starts with `file:line:`."""


@dataclass(frozen=True)
class GRCRecord:
    query: str
    positive: str
    reasoning: str = ""
    answer: str = ""
    negatives: tuple[str, ...] = field(default_factory=tuple)
    compress_target: str | None = None


def parse_record(line: str | bytes, where: str) -> GRCRecord:
    """Parse one JSONL line; `where` (e.g. `data/train.jsonl:12`) prefixes every error."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadLineError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise BadLineError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise BadLineError(f"{where}: unknown field(s) {unknown}; expected fields: {list(FIELDS)}")
    for key in ("query", "positive"):
        value = obj.get(key)
        if not isinstance(value, str) or not value.strip():
            raise BadLineError(f"{where}: field '{key}' must be a non-empty string, got {value!r}")
    for key in ("reasoning", "answer", "compress_target"):
        if key in obj and obj[key] is not None and not isinstance(obj[key], str):
            raise BadLineError(f"{where}: field '{key}' must be a string, got {obj[key]!r}")
    negatives = obj.get("negatives", [])
    if not isinstance(negatives, list) or not all(
        isinstance(n, str) and n.strip() for n in negatives
    ):
        raise BadLineError(f"{where}: field 'negatives' must be a list of non-empty strings")
    target = obj.get("compress_target")
    if target is not None and not target.strip():
        raise BadLineError(f"{where}: field 'compress_target' must not be empty when given")
    return GRCRecord(
        query=obj["query"],
        positive=obj["positive"],
        reasoning=obj.get("reasoning") or "",
        answer=obj.get("answer") or "",
        negatives=tuple(negatives),
        compress_target=target,
    )
