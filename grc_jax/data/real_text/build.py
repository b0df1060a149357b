"""What every real-text builder shares: candidates -> capped, deduplicated records, split by source
item, hard negatives from the same split, and the output directory (JSONL splits, BEIR
directories of the held-out splits, stats.json).

A source describes itself as a `Source`: its work units (cheap to list: Debian source packages,
man-page files, Python modules) and a function turning one unit into `Candidate`s or `Skip`s
(possibly slow: rendering a man page, parsing a module). Units are shuffled with the seed and
expanded lazily, so `--limit` stops the slow work early and still draws a seeded sample.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from grc_jax.core.errors import UsageError
from grc_jax.data.formats import records_to_beir, write_beir, write_jsonl
from grc_jax.data.real_text.text import cap_words, normalise, squash, squash_lines, word_count

SPLITS = ("train", "validation", "test")
QUERY_MAX_WORDS = 48  # a "query" longer than this is a paragraph, not a query


@dataclass(frozen=True)
class Candidate:
    """One possible record, before capping and dedupe."""

    query: str
    positive: str  # paragraphs separated by blank lines; lines inside a paragraph are list items
    item: str  # the split unit: records of one item never straddle splits
    groups: tuple[str, ...]  # neighbourhoods for hard negatives, most specific first
    name: str  # what the record is about (package, page, qualified name)


@dataclass(frozen=True)
class Skip:
    reason: str
    name: str = ""


@dataclass(frozen=True)
class Source:
    """A source of candidates: `expand(unit)` turns one of `units` into candidates and skips.

    `same_item_negatives`: whether records of the same item may be each other's negatives (yes for
    docstrings, whose siblings in a module are the intended negatives; no for Debian, where the
    binary packages of one source often repeat one text with small changes).
    """

    name: str
    units: Sequence[object]
    expand: Callable[[object], Sequence[Candidate | Skip]]
    same_item_negatives: bool = False
    workers: int = 1
    found_extra: dict = field(default_factory=dict)  # source-specific counts for stats.json


@dataclass(frozen=True)
class BuildOptions:
    """Options common to every builder (the CLI's `--seed`, `--max-words`, ... flags)."""

    seed: int = 0
    max_words: int = 80
    min_words: int = 8
    negatives: int = 3
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)
    limit: int | None = None

    def __post_init__(self):
        if self.max_words < 1 or self.min_words < 1 or self.min_words > self.max_words:
            raise UsageError(
                f"--max-words {self.max_words} / --min-words {self.min_words}: expected "
                "1 <= min-words <= max-words"
            )
        if self.negatives < 0:
            raise UsageError(f"--negatives {self.negatives}: expected a count >= 0")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit {self.limit}: expected a positive count")
        f = self.fractions
        if len(f) != 3 or any(x < 0 for x in f) or abs(sum(f) - 1.0) > 1e-6:
            raise UsageError(
                f"--fractions {','.join(map(str, f))}: expected three numbers >= 0 "
                "(train,validation,test) that sum to 1"
            )


def parse_fractions(text: str) -> tuple[float, float, float]:
    """`'0.9,0.05,0.05'` -> (0.9, 0.05, 0.05); a UsageError names the flag otherwise."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise UsageError(f"--fractions {text!r}: expected three comma-separated numbers")
    return values  # type: ignore[return-value]


def split_of(item: str, seed: int, fractions: Sequence[float]) -> str:
    """The split of a source item: a hash of (seed, item) against the cumulative fractions, so an
    item's split does not depend on which other items exist (or on `--limit`)."""
    digest = hashlib.sha256(f"{seed}\0{item}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for split, fraction in zip(SPLITS, fractions):
        edge += fraction
        if u < edge:
            return split
    return next(s for s, f in zip(reversed(SPLITS), reversed(fractions)) if f > 0)


def _ordered_map(fn, units: Sequence, workers: int) -> Iterator:
    """`map(fn, units)` in order, `workers` threads ahead (for subprocess-bound work); the caller
    may stop early."""
    if workers <= 1:
        yield from map(fn, units)
        return
    window = workers * 4
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(fn, u) for u in units[:window]]
        nxt = len(futures)
        i = 0
        try:
            while i < len(futures):
                yield futures[i].result()
                futures[i] = None  # type: ignore[call-overload]
                i += 1
                if nxt < len(units):
                    futures.append(pool.submit(fn, units[nxt]))
                    nxt += 1
        finally:
            for f in futures[i:]:
                f.cancel()


@dataclass
class _Rec:
    query: str
    positive: str
    item: str
    groups: tuple[str, ...]
    name: str
    negatives: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {"query": self.query, "positive": self.positive}
        if self.negatives:
            out["negatives"] = self.negatives
        return out


def _select(source: Source, opts: BuildOptions, stats: dict) -> list[_Rec]:
    """Expand the seeded-shuffled units into capped, deduplicated records (up to `limit`)."""
    units = list(source.units)
    random.Random(opts.seed).shuffle(units)
    skipped: Counter = Counter()
    dropped: Counter = Counter()
    seen_pair: set[str] = set()
    seen_positive: set[str] = set()
    seen_query: set[str] = set()
    kept: list[_Rec] = []
    found = 0
    units_done = 0
    for results in _ordered_map(source.expand, units, source.workers):
        units_done += 1
        for c in results:
            found += 1
            if isinstance(c, Skip):
                skipped[c.reason] += 1
                continue
            query = squash(c.query.replace("\n", " "))
            positive = cap_words(squash_lines(c.positive), opts.max_words)
            if positive is None:
                skipped["first sentence longer than --max-words"] += 1
                continue
            if word_count(positive) < opts.min_words:
                skipped["positive shorter than --min-words"] += 1
                continue
            if not query or word_count(query) > QUERY_MAX_WORDS:
                skipped[f"query empty or longer than {QUERY_MAX_WORDS} words"] += 1
                continue
            nq, np_ = normalise(query), normalise(positive)
            if nq + "\0" + np_ in seen_pair:
                dropped["duplicate query+positive"] += 1
            elif np_ in seen_positive:
                dropped["duplicate positive"] += 1
            elif nq in seen_query:
                dropped["duplicate query"] += 1
            else:
                seen_pair.add(nq + "\0" + np_)
                seen_positive.add(np_)
                seen_query.add(nq)
                kept.append(_Rec(query, positive, c.item, c.groups, c.name))
                continue
            seen_pair.add(nq + "\0" + np_)
        if opts.limit is not None and len(kept) >= opts.limit:
            kept = kept[: opts.limit]
            break
    stats.update(
        units=len(units), units_read=units_done, found=found, skipped=dict(sorted(skipped.items())),
        deduplicated=dict(sorted(dropped.items())), **source.found_extra,
    )  # fmt: skip
    return kept


def _add_negatives(records: list[_Rec], n: int, rng: random.Random, same_item: bool) -> int:
    """Give each record up to `n` negatives from `records` (one split): from its most specific
    group first, then broader groups, then anywhere in the split. Returns how many negatives
    came from outside the record's most specific group."""
    if n == 0 or len(records) < 2:
        return 0
    pools: dict[tuple[int, str], list[int]] = {}
    for i, r in enumerate(records):
        for level, g in enumerate(r.groups):
            pools.setdefault((level, g), []).append(i)
    everyone = list(range(len(records)))
    borrowed = 0
    for i, r in enumerate(records):
        chosen: list[int] = []
        levels = [pools[(lv, g)] for lv, g in enumerate(r.groups)] + [everyone]
        for level, pool in enumerate(levels):
            need = n - len(chosen)
            if need == 0:
                break
            # Sample a few extra to make up for self, same-item records and earlier picks.
            k = min(len(pool), need + len(chosen) + 8)
            for j in rng.sample(pool, k):
                if len(chosen) == n:
                    break
                other = records[j]
                if j == i or j in chosen or (not same_item and other.item == r.item):
                    continue
                chosen.append(j)
                borrowed += level > 0
        r.negatives = [records[j].positive for j in chosen]
    return borrowed


def build_records(
    source: Source, opts: BuildOptions, t0: float | None = None
) -> tuple[dict[str, list[dict]], dict]:
    """One source's records by split (with negatives, shuffled) and its stats; `t0`: when making
    the source began (`time.perf_counter()`), for the stats' `seconds`."""
    t0 = time.perf_counter() if t0 is None else t0
    stats: dict = {"source": source.name}
    records = _select(source, opts, stats)
    by_split: dict[str, list[_Rec]] = {s: [] for s in SPLITS}
    for r in records:
        by_split[split_of(r.item, opts.seed, opts.fractions)].append(r)
    borrowed = {}
    for split in SPLITS:
        rng = random.Random(f"{opts.seed}:{source.name}:{split}")
        borrowed[split] = _add_negatives(
            by_split[split], opts.negatives, rng, source.same_item_negatives
        )
        rng.shuffle(by_split[split])
    stats["written"] = {s: len(v) for s, v in by_split.items()}
    stats["items"] = {s: len({r.item for r in v}) for s, v in by_split.items()}
    stats["negatives_outside_group"] = borrowed
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    stats["samples"] = [r.to_json() | {"name": r.name} for r in by_split["train"][:3]]
    return {s: [r.to_json() for r in v] for s, v in by_split.items()}, stats


def build_source(
    make_source: Callable[[], Source], opts: BuildOptions, out_dir: str | Path
) -> dict:
    """Make a source and build it into `out_dir` (train/validation/test JSONL, `<split>_beir/` for
    the held-out splits, stats.json); returns the stats."""
    t0 = time.perf_counter()
    splits, stats = build_records(make_source(), opts, t0)
    write_output(out_dir, splits, stats)
    return stats


def write_output(out_dir: str | Path, splits: dict[str, list[dict]], stats: dict) -> None:
    """`<out>/<split>.jsonl`, `<out>/{validation,test}_beir/`, `<out>/stats.json`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, recs in splits.items():
        write_jsonl(out / f"{split}.jsonl", recs)
        if split != "train":
            write_beir(out / f"{split}_beir", *records_to_beir(recs), split=split)
    counts = {k: v for k, v in stats.items() if k != "samples"}
    (out / "stats.json").write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")


def merge_outputs(
    out_dir: str | Path, parts: dict[str, dict[str, list[dict]]], seed: int, stats: dict
) -> dict[str, dict[str, int]]:
    """Concatenate the splits of several sources (`parts[source][split]`), shuffle each split with
    the seed, and write them like one source. Returns the table `split -> source -> count`."""
    table = {s: {name: len(p.get(s, [])) for name, p in parts.items()} for s in SPLITS}
    merged = {}
    for split in SPLITS:
        recs = [r for name in sorted(parts) for r in parts[name].get(split, [])]
        random.Random(f"{seed}:merged:{split}").shuffle(recs)
        merged[split] = recs
    write_output(out_dir, merged, stats | {"sources": table})
    return table


def format_stats(stats: dict) -> str:
    """A few human-readable lines of one source's counts."""
    lines = [
        f"{stats['source']}: {stats['found']} found in {stats['units_read']}/{stats['units']} "
        f"units, {sum(stats['written'].values())} written in {stats['seconds']} s"
    ]
    for key in ("skipped", "deduplicated"):
        if stats[key]:
            lines.append(f"  {key}: " + ", ".join(f"{k} {v}" for k, v in stats[key].items()))
    lines.append(
        "  written: "
        + ", ".join(f"{s} {n} ({stats['items'][s]} items)" for s, n in stats["written"].items())
    )
    return "\n".join(lines)


def as_list(values: Iterable[str] | str) -> list[str]:
    """`'a,b'` or `['a', 'b']` -> `['a', 'b']` (blank entries dropped)."""
    if isinstance(values, str):
        values = values.split(",")
    return [v.strip() for v in values if v.strip()]
