"""Retrieval test sets in BEIR's form: a corpus, queries and graded relevance judgements (qrels).

Two sources give the same `RetrievalSet`:

- a BEIR directory (`corpus.jsonl` `{"_id", "title", "text"}`, `queries.jsonl` `{"_id", "text"}`,
  `qrels/<split>.tsv` with the header `query-id<TAB>corpus-id<TAB>score`); as BEIR's own loader
  does, queries without qrels are dropped and a document is `title + " " + text` (empty
  documents and queries are left out);
- a held-out split of our JSONL schema (`grc_jax.data.schema`): the corpus is every positive and
  negative of the split, deduplicated in order of first appearance (`d0`, `d1`, ...); query `qN`
  is record N, relevant (score 1) to its positive; its negatives are its hard negatives.

The BEIR reader here is a minimal one for evaluation (streamed line by line, every fault named by
`file:line`); the data layer may later own the reader, and this module would then call it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from grc_jax.core.errors import DataError, MissingPathError
from grc_jax.data.sources import read_records


class BeirFormatError(DataError):
    """A BEIR directory is malformed: the message names the file (and line) at fault."""


@dataclasses.dataclass(frozen=True)
class RetrievalSet:
    """Queries, a corpus and judgements; `negatives[qid]` lists hard-negative document ids."""

    name: str
    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    negatives: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def relevant(self, qid: str) -> list[str]:
        """Documents judged relevant (score > 0) to `qid`, best first (ties in qrels order)."""
        judged = [(d, s) for d, s in self.qrels.get(qid, {}).items() if s > 0]
        return [d for d, _ in sorted(judged, key=lambda x: -x[1])]

    def subset(self, limit: int | None = None, max_corpus: int | None = None) -> RetrievalSet:
        """The first `limit` queries; with `max_corpus`, a corpus of their judged and hard
        negative documents filled up to `max_corpus` in corpus order (never below the judged)."""
        qids = list(self.queries)[:limit] if limit is not None else list(self.queries)
        queries = {q: self.queries[q] for q in qids}
        qrels = {q: self.qrels[q] for q in qids}
        negatives = {q: self.negatives[q] for q in qids if q in self.negatives}
        corpus = self.corpus
        if max_corpus is not None:
            keep = dict.fromkeys(
                d for q in qids for d in [*qrels[q], *negatives.get(q, [])] if d in self.corpus
            )
            for d in self.corpus:
                if len(keep) >= max_corpus:
                    break
                keep.setdefault(d)
            corpus = {d: self.corpus[d] for d in self.corpus if d in keep}
        return RetrievalSet(self.name, corpus, queries, qrels, negatives)


def _jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    """Objects of a JSONL file, each with string `required` fields (blank lines skipped)."""
    if not path.is_file():
        raise BeirFormatError(f"BEIR file {str(path)!r} is missing")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BeirFormatError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise BeirFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for key in required:
                if not isinstance(obj.get(key), str):
                    raise BeirFormatError(
                        f"{where}: field {key!r} must be a string, got {obj.get(key)!r:.60}"
                    )
            out.append(obj)
    return out


def _unique(rows: list[dict], path: Path) -> None:
    seen: set[str] = set()
    for r in rows:
        if r["_id"] in seen:
            raise BeirFormatError(f"{path}: id {r['_id']!r} appears more than once")
        seen.add(r["_id"])


def _qrels(path: Path) -> dict[str, dict[str, int]]:
    if not path.is_file():
        splits = sorted(p.stem for p in path.parent.glob("*.tsv")) if path.parent.is_dir() else []
        raise BeirFormatError(
            f"BEIR qrels {str(path)!r} is missing (splits present: {splits or 'none'})"
        )
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if header is None or [h.strip() for h in header[:3]] != [
            "query-id",
            "corpus-id",
            "score",
        ]:
            raise BeirFormatError(
                f"{path}:1: expected the header 'query-id<TAB>corpus-id<TAB>score', got {header!r}"
            )
        for n, row in enumerate(rows, 2):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 3:
                raise BeirFormatError(f"{path}:{n}: expected 3 tab-separated fields, got {row!r}")
            try:
                score = int(row[2])
            except ValueError:
                raise BeirFormatError(
                    f"{path}:{n}: score must be an integer, got {row[2]!r}"
                ) from None
            qrels.setdefault(row[0], {})[row[1]] = score
    return qrels


def read_beir(directory: str | Path, split: str = "test") -> RetrievalSet:
    """A BEIR directory's corpus, its queries that have qrels in `split`, and those qrels."""
    d = Path(directory)
    if not d.exists():
        raise MissingPathError(f"BEIR directory {str(d)!r} does not exist")
    if not d.is_dir():
        raise BeirFormatError(f"BEIR directory {str(d)!r} is not a directory")
    corpus_rows = _jsonl(d / "corpus.jsonl", ("_id", "text"))
    query_rows = _jsonl(d / "queries.jsonl", ("_id", "text"))
    _unique(corpus_rows, d / "corpus.jsonl")
    _unique(query_rows, d / "queries.jsonl")
    qrels = _qrels(d / "qrels" / f"{split}.tsv")
    corpus = {}
    for r in corpus_rows:
        title = r.get("title") if isinstance(r.get("title"), str) else ""
        doc = f"{title} {r['text']}".strip()
        if doc:  # an empty document can be neither embedded nor retrieved
            corpus[r["_id"]] = doc
    queries = {r["_id"]: r["text"] for r in query_rows if r["_id"] in qrels and r["text"].strip()}
    if not corpus:
        raise BeirFormatError(f"BEIR file {str(d / 'corpus.jsonl')!r} holds no document")
    if not queries:
        raise BeirFormatError(
            f"BEIR directory {str(d)!r}: no query of queries.jsonl has qrels in qrels/{split}.tsv"
        )
    return RetrievalSet(f"beir:{d.name}/{split}", corpus, queries, {q: qrels[q] for q in queries})


def from_jsonl(path: str | Path, limit: int | None = None) -> RetrievalSet:
    """A held-out JSONL split (our schema) as corpus / queries / qrels (first `limit` records)."""
    p = Path(path)
    records = read_records(p, limit)
    if not records:
        raise DataError(f"data file {str(p)!r} holds no record")
    ids: dict[str, str] = {}
    for r in records:
        for doc in (r.positive, *r.negatives):
            ids.setdefault(doc, f"d{len(ids)}")
    queries, qrels, negatives = {}, {}, {}
    for i, r in enumerate(records):
        qid = f"q{i}"
        queries[qid] = r.query
        qrels[qid] = {ids[r.positive]: 1}
        negatives[qid] = [ids[n] for n in r.negatives if n != r.positive]
    corpus = {doc_id: doc for doc, doc_id in ids.items()}
    return RetrievalSet(f"jsonl:{p.name}", corpus, queries, qrels, negatives)


def load_retrieval_set(
    beir: str | None = None, data: str | None = None, split: str = "test"
) -> RetrievalSet:
    """`read_beir(beir, split)` or `from_jsonl(data)`: exactly one of the two."""
    if (beir is None) == (data is None):
        raise DataError("give exactly one of a BEIR directory or a JSONL file")
    if beir is not None:
        return read_beir(beir, split)
    p = Path(data)
    if p.is_dir():
        if (p / "corpus.jsonl").is_file():
            return read_beir(p, split)
        raise DataError(f"{str(p)!r} is a directory but not a BEIR one (no corpus.jsonl)")
    return from_jsonl(p)
