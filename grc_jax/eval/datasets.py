"""Retrieval test sets in BEIR's form: a corpus, queries and graded relevance judgements (qrels).

Two sources give the same `RetrievalSet`, both read by the data layer's one BEIR reader and
converter (`grc_jax.data.formats`), so that a JSONL split and the BEIR directory written from it
(`grc data ...` writes `<split>_beir/`) evaluate with the same ids and the same figures:

- a BEIR directory (`corpus.jsonl` `{"_id", "title", "text"}`, `queries.jsonl` `{"_id", "text"}`,
  `qrels/<split>.tsv` with the header `query-id<TAB>corpus-id<TAB>score`): the queries named in
  the split's qrels (`read_beir`);
- a held-out split of our JSONL schema (`grc_jax.data.schema`): `records_to_beir` (corpus = every
  positive and negative, deduplicated, ids from the text's hash; query `qN` is record N, relevant
  to its positive), plus each query's negatives as its hard negatives (for RAG distractors).

Empty documents and queries are left out here (they can be neither embedded nor retrieved).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from grc_jax.core.errors import DataError
from grc_jax.data import formats


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


def read_beir(directory: str | Path, split: str = "test") -> RetrievalSet:
    """A BEIR directory's corpus, the queries judged in `split`, and their qrels."""
    d = Path(directory)
    corpus, queries, qrels = formats.read_beir(d, split)
    return _retrieval_set(f"beir:{d.name}/{split}", corpus, queries, qrels, {})


def from_jsonl(path: str | Path) -> RetrievalSet:
    """A held-out JSONL split (our schema) as corpus / queries / qrels and hard negatives."""
    p = Path(path)
    records = formats.read_records(p)
    if not records:
        raise DataError(f"{p}: holds no record")
    corpus, queries, qrels = formats.records_to_beir(records)
    negatives = {
        qid: [formats.doc_id(n) for n in r.get("negatives", []) if n != r["positive"]]
        for qid, r in zip(queries, records)
    }
    return _retrieval_set(f"jsonl:{p.name}", corpus, queries, qrels, negatives)


def _retrieval_set(name: str, corpus: dict[str, str], queries: dict[str, str],
                   qrels: dict[str, dict[str, int]],
                   negatives: dict[str, list[str]]) -> RetrievalSet:  # fmt: skip
    corpus = {d: t for d, t in corpus.items() if t.strip()}
    queries = {q: t for q, t in queries.items() if t.strip()}
    if not corpus:
        raise DataError(f"{name}: the corpus holds no (non-empty) document")
    if not queries:
        raise DataError(f"{name}: no (non-empty) query has relevance judgements")
    return RetrievalSet(name, corpus, queries, {q: qrels[q] for q in queries},
                        {q: negatives[q] for q in queries if q in negatives})  # fmt: skip


def load_retrieval_set(beir: str | None = None, data: str | None = None,
                       split: str = "test") -> RetrievalSet:  # fmt: skip
    """`read_beir(beir, split)` or `from_jsonl(data)`: exactly one of the two (`data` may also
    name a BEIR directory)."""
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
