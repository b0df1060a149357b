"""Formats users already hold, to and from our JSONL schema (`grc_jax.data.schema`).

- BEIR directories: `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`),
  `qrels/<split>.tsv` (header `query-id<TAB>corpus-id<TAB>score`). `read_beir` / `write_beir` are
  the one reader and writer (evaluation reads BEIR directories through `read_beir` too).
- sentence-transformers pair / triplet JSONL: lines `[anchor, positive(, negative)]`, or objects
  `{anchor, positive(, negative)}`, `{query, pos: [...], neg: [...]}`, `{sentence1, sentence2}`.

A bad line is a `DataError` that names `file:line` and what was expected.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from grc_jax.core.errors import DataError, MissingPathError
from grc_jax.data.schema import parse_record

Corpus = dict[str, str]
Queries = dict[str, str]
Qrels = dict[str, dict[str, int]]


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Write records (our schema, keys sorted) one per line; each is checked with `parse_record`
    first. Returns the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for n, rec in enumerate(records, start=1):
            line = json.dumps(rec, sort_keys=True, ensure_ascii=False)
            parse_record(line, f"{path}:{n}")
            f.write(line + "\n")
    return n


def _json_lines(path: Path) -> Iterator[tuple[str, object]]:
    """(`file:line`, parsed JSON) of every non-blank line."""
    if not path.is_file():
        raise MissingPathError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e})") from None


# ---------------------------------------------------------------------------------------- BEIR


def doc_text(title: str, text: str) -> str:
    """A BEIR document as one text: the title on its own line above the text, when there is one."""
    title, text = title.strip(), text.strip()
    return f"{title}\n{text}" if title and text else title or text


def _id_text(where: str, obj: object, fields: tuple[str, ...]) -> tuple[str, dict]:
    if not isinstance(obj, dict) or "_id" not in obj:
        raise DataError(f"{where}: expected a JSON object with '_id' and {', '.join(fields)}")
    for key in fields:
        if not isinstance(obj.get(key, ""), str):
            raise DataError(f"{where}: field '{key}' must be a string, got {obj[key]!r}")
    return str(obj["_id"]), obj


def read_qrels(path: Path) -> Qrels:
    """`qrels/<split>.tsv` -> {query id: {doc id: score}}; the header line is optional."""
    if not path.is_file():
        raise MissingPathError(f"{path}: no such file (expected BEIR qrels for this split)")
    qrels: Qrels = {}
    with path.open(encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t"), start=1):
            if not row or not "".join(row).strip():
                continue
            if n == 1 and row[0].strip().lower() in ("query-id", "query_id", "qid"):
                continue
            if len(row) < 3:
                raise DataError(
                    f"{path}:{n}: expected 'query-id<TAB>corpus-id<TAB>score', got {row!r}"
                )
            try:
                score = int(float(row[2]))
            except ValueError:
                raise DataError(f"{path}:{n}: score {row[2]!r} is not a number") from None
            qrels.setdefault(row[0].strip(), {})[row[1].strip()] = score
    return qrels


def read_beir(directory: str | Path, split: str = "test") -> tuple[Corpus, Queries, Qrels]:
    """A BEIR directory -> (corpus {id: title + text}, queries {id: text}, qrels {qid: {docid:
    score}}) for `split`. Queries are those named in the split's qrels; a qrels line naming an
    unknown query or document is a DataError."""
    root = Path(directory)
    if not root.is_dir():
        raise MissingPathError(f"{root}: no such BEIR directory")
    qrels_path = root / "qrels" / f"{split}.tsv"
    qrels = read_qrels(qrels_path)
    corpus: Corpus = {}
    for where, obj in _json_lines(root / "corpus.jsonl"):
        doc_id, obj = _id_text(where, obj, ("title", "text"))
        corpus[doc_id] = doc_text(obj.get("title") or "", obj.get("text") or "")
    queries: Queries = {}
    for where, obj in _json_lines(root / "queries.jsonl"):
        qid, obj = _id_text(where, obj, ("text",))
        if qid in qrels:
            queries[qid] = obj.get("text") or ""
    for qid, docs in qrels.items():
        if qid not in queries:
            raise DataError(f"{qrels_path}: query id {qid!r} is not in queries.jsonl")
        missing = [d for d in docs if d not in corpus]
        if missing:
            raise DataError(f"{qrels_path}: query {qid!r} names document(s) {missing[:3]} that "
                            "are not in corpus.jsonl")  # fmt: skip
    return corpus, queries, qrels


def write_beir(
    directory: str | Path, corpus: Corpus, queries: Queries, qrels: Qrels, split: str = "test"
) -> None:
    """Write a BEIR directory (titles empty: our documents are one text)."""
    root = Path(directory)
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    with (root / "corpus.jsonl").open("w", encoding="utf-8") as f:
        for doc_id, text in corpus.items():
            f.write(json.dumps({"_id": doc_id, "title": "", "text": text}, ensure_ascii=False))
            f.write("\n")
    with (root / "queries.jsonl").open("w", encoding="utf-8") as f:
        for qid, text in queries.items():
            f.write(json.dumps({"_id": qid, "text": text}, ensure_ascii=False) + "\n")
    with (root / "qrels" / f"{split}.tsv").open("w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, docs in qrels.items():
            for doc_id, score in docs.items():
                f.write(f"{qid}\t{doc_id}\t{score}\n")


def doc_id(text: str) -> str:
    """A stable document id: a hash of the text, so one text has one id in every file."""
    return "d" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def records_to_beir(records: Iterable[dict]) -> tuple[Corpus, Queries, Qrels]:
    """Our records -> BEIR (corpus = positives and negatives, deduplicated; query ids `q1, q2, ...`
    in record order; each record's positive has score 1)."""
    corpus: Corpus = {}
    queries: Queries = {}
    qrels: Qrels = {}
    for n, rec in enumerate(records, start=1):
        qid = f"q{n}"
        queries[qid] = rec["query"]
        for text in [rec["positive"], *rec.get("negatives", [])]:
            corpus.setdefault(doc_id(text), text)
        qrels[qid] = {doc_id(rec["positive"]): 1}
    return corpus, queries, qrels


def read_records(path: str | Path) -> list[dict]:
    """Our JSONL file -> records as dicts (each line checked with `parse_record`)."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"{path}: no such file")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                r = parse_record(line, f"{path}:{n}")
                rec = {"query": r.query, "positive": r.positive}
                if r.negatives:
                    rec["negatives"] = list(r.negatives)
                out.append(rec)
    return out


def beir_to_records(
    corpus: Corpus, queries: Queries, qrels: Qrels, negatives: int = 0, seed: int = 0
) -> list[dict]:
    """One record per (query, relevant document with score > 0), in qrels order, documents by
    descending score; `negatives` random non-relevant documents each (seeded)."""
    rng = random.Random(seed)
    doc_ids = list(corpus)
    records = []
    for qid, docs in qrels.items():
        judged = set(docs)
        relevant = sorted((d for d, s in docs.items() if s > 0), key=lambda d: (-docs[d], d))
        for d in relevant:
            rec = {"query": queries[qid], "positive": corpus[d]}
            if negatives and len(doc_ids) > len(judged):
                picked: list[str] = []
                tries = 0
                while len(picked) < negatives and tries < negatives * 20:
                    cand = doc_ids[rng.randrange(len(doc_ids))]
                    tries += 1
                    if cand not in judged and cand not in picked and corpus[cand].strip():
                        picked.append(cand)
                if picked:
                    rec["negatives"] = [corpus[c] for c in picked]
            if rec["query"].strip() and rec["positive"].strip():
                records.append(rec)
    return records


# ------------------------------------------------------------------------ sentence-transformers

ST_FORMS = (
    "[anchor, positive] or [anchor, positive, negative], or an object with keys "
    "(anchor, positive[, negative]), (query, pos[, neg]) or (sentence1, sentence2)"
)


def _text(where: str, key: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return value


def _texts(where: str, key: str, value: object) -> list[str]:
    """A string or a list of strings -> list of non-empty strings."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise DataError(f"{where}: '{key}' must not be an empty list")
    return [_text(where, f"{key}[{i}]" if isinstance(value, list) else key, v)
            for i, v in enumerate(values)]  # fmt: skip


def st_records(where: str, obj: object) -> list[dict]:
    """One sentence-transformers line -> our records (several for `{query, pos: [a, b]}`)."""
    if isinstance(obj, list):
        if len(obj) not in (2, 3):
            raise DataError(f"{where}: expected {ST_FORMS}; got a list of {len(obj)} items")
        names = ("anchor", "positive", "negative")
        texts = [_text(where, names[i], v) for i, v in enumerate(obj)]
        rec = {"query": texts[0], "positive": texts[1]}
        return [rec | {"negatives": [texts[2]]}] if len(texts) == 3 else [rec]
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected {ST_FORMS}; got {type(obj).__name__}")
    keys = set(obj)
    for required, optional, q, p, n in (
        ({"anchor", "positive"}, {"negative"}, "anchor", "positive", "negative"),
        ({"query", "pos"}, {"neg"}, "query", "pos", "neg"),
        ({"sentence1", "sentence2"}, set(), "sentence1", "sentence2", None),
    ):
        if required <= keys:
            extra = keys - required - optional
            if extra:
                raise DataError(f"{where}: unexpected key(s) {sorted(extra)} beside "
                                f"{sorted(required | optional)}; expected {ST_FORMS}")  # fmt: skip
            query = _text(where, q, obj[q])
            negs = _texts(where, n, obj[n]) if n and n in obj else []
            recs = []
            for pos in _texts(where, p, obj[p]):
                recs.append(
                    {"query": query, "positive": pos} | ({"negatives": negs} if negs else {})
                )
            return recs
    raise DataError(f"{where}: expected {ST_FORMS}; got keys {sorted(keys)}")


def read_st(path: str | Path) -> list[dict]:
    """A sentence-transformers pair / triplet JSONL file -> our records."""
    records = []
    for where, obj in _json_lines(Path(path)):
        records += st_records(where, obj)
    return records
