"""Deterministic synthetic GRC corpus: retrieval that needs one reasoning step.

Every document states one number about one entity ("velora is a city . its population is 42
thousand ."). A query never states that number directly: it spells it in words ("which city has a
population of forty two thousand ?") or as a sum ("... of 40 + 2 thousand ?"), so finding the
document takes one reasoning step ("forty two = 42", "40 + 2 = 42"); the answer is the number. Hard
negatives are documents of the same kind whose numbers are near misses (41, 43, ...), so the words
of a query single out a few dozen candidates and only the reasoned number singles out one.

Two document families: facts about places (cities, rivers, lakes, towers) and possessions of people
("nia has 42 lamps ."), queried as arithmetic word problems ("nia has 40 lamps and gets 2 more .
how many lamps does nia have ?"). Each person owns several documents (different numbers), so a
person's name alone does not find the document either.

Train / validation / test use disjoint entity names, drawn from one seeded generator.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th"]

# kind, attribute, unit
PLACE_KINDS = [
    ("city", "population", "thousand"),
    ("river", "length", "km"),
    ("lake", "depth", "meters"),
    ("tower", "height", "meters"),
]
OBJECTS = ["lamps", "books", "apples", "coins", "shells", "cups"]
PEOPLE_PER_OBJECT = 3
LOW, HIGH = 10, 99  # every stated number is two digits; query operands are too where possible

SPLITS = {"train": 0.8, "validation": 0.1, "test": 0.1}


@dataclass(frozen=True)
class Doc:
    kind: str  # place kind, or "person:<object>"
    name: str
    value: int
    text: str


def _name(rng: random.Random, syllables: int) -> str:
    return "".join(
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
    )


def _unique_names(rng: random.Random, count: int) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        name = _name(rng, rng.choice([2, 2, 3]))
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _place_doc(kind: str, attr: str, unit: str, name: str, value: int) -> Doc:
    return Doc(kind, name, value, f"{name} is a {kind} . its {attr} is {value} {unit} .")


def _person_doc(obj: str, name: str, value: int) -> Doc:
    return Doc(f"person:{obj}", name, value, f"{name} has {value} {obj} .")


_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
          "eighteen", "nineteen"]  # fmt: skip
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(v: int) -> str:
    """10..99 in words: 42 -> 'forty two', 17 -> 'seventeen', 30 -> 'thirty'."""
    if v < 10 or v > 99:
        raise ValueError(f"number_words covers 10..99, got {v}")
    if v < 20:
        return _TEENS[v - 10]
    return _TENS[v // 10] + ("" if v % 10 == 0 else " " + _ONES[v % 10])


def _describe(rng: random.Random, value: int) -> tuple[str, str]:
    """(description, reasoning) of `value`: in words, or as a sum without carry (40 + 2)."""
    ones = value % 10
    if rng.random() < 0.5 or ones == 0:
        words = number_words(value)
        return words, f"{words} = {value}"
    b = rng.randint(1, ones)
    a = value - b
    return f"{a} + {b}", f"{a} + {b} = {value}"


def _query(rng: random.Random, doc: Doc, place: tuple[str, str, str] | None) -> dict:
    if place is not None:
        kind, attr, unit = place
        description, reasoning = _describe(rng, doc.value)
        query = f"which {kind} has a {attr} of {description} {unit} ?"
    else:
        obj = doc.kind.split(":", 1)[1]
        ones = doc.value % 10
        b = rng.randint(1, max(1, ones)) if ones else rng.randint(1, 9)
        if ones:  # gets b more: a + b = v, no carry
            a, reasoning = doc.value - b, f"{doc.value - b} + {b} = {doc.value}"
            event = f"gets {b} more"
        else:  # gives away b: a - b = v, no borrow (v ends in 0)
            a, reasoning = doc.value + b, f"{doc.value + b} - {b} = {doc.value}"
            event = f"gives away {b}"
        query = f"{doc.name} has {a} {obj} and {event} . how many {obj} does {doc.name} have ?"
    return {"query": query, "reasoning": reasoning, "answer": str(doc.value)}


def _split_docs(rng: random.Random, names: list[str], fraction_values: float) -> list[Doc]:
    """Documents for one split: for each place kind a random subset of values, one entity each;
    for each object a few people, each owning several different numbers of it."""
    docs: list[Doc] = []
    names_iter = iter(names)
    values = list(range(LOW, HIGH + 1))
    per_kind = max(4, int(len(values) * fraction_values))
    for kind, attr, unit in PLACE_KINDS:
        for v in sorted(rng.sample(values, per_kind)):
            docs.append(_place_doc(kind, attr, unit, next(names_iter), v))
    for obj in OBJECTS:
        people = [next(names_iter) for _ in range(PEOPLE_PER_OBJECT)]
        chosen = sorted(rng.sample(values, max(4, per_kind // 2)))
        for i, v in enumerate(chosen):
            docs.append(_person_doc(obj, people[i % PEOPLE_PER_OBJECT], v))
    return docs


def make_split(
    rng: random.Random,
    names: list[str],
    fraction_values: float,
    queries_per_doc: int,
    negatives: int,
) -> list[dict]:
    docs = _split_docs(rng, names, fraction_values)
    by_kind: dict[str, list[Doc]] = {}
    for d in docs:
        by_kind.setdefault(d.kind, []).append(d)
    places = {k: (k, a, u) for k, a, u in PLACE_KINDS}
    examples = []
    for doc in docs:
        same_kind = [d for d in by_kind[doc.kind] if d is not doc]
        # Nearest numbers first; for people, their own other documents first.
        near = sorted(
            same_kind, key=lambda d: (d.name != doc.name, abs(d.value - doc.value), d.value)
        )[:negatives]
        for _ in range(queries_per_doc):
            ex = _query(rng, doc, places.get(doc.kind))
            ex["positive"] = doc.text
            ex["negatives"] = [d.text for d in near]
            examples.append(ex)
    rng.shuffle(examples)
    return examples


def synthesize(
    out_dir: str | Path,
    seed: int = 0,
    queries_per_doc: int = 3,
    negatives: int = 2,
    value_fraction: float = 0.9,
) -> dict[str, int]:
    """Write `train.jsonl`, `validation.jsonl`, `test.jsonl` under `out_dir`; returns line counts.

    The same arguments always write the same bytes.
    """
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_split_entities = len(range(LOW, HIGH + 1)) * len(PLACE_KINDS) + PEOPLE_PER_OBJECT * len(
        OBJECTS
    )
    names = _unique_names(rng, per_split_entities * len(SPLITS))
    counts = {}
    for i, split in enumerate(SPLITS):
        split_names = names[i * per_split_entities : (i + 1) * per_split_entities]
        # Held-out splits use fewer values and one query per document: a smaller, harder corpus.
        held_out = split != "train"
        examples = make_split(
            rng,
            split_names,
            value_fraction * (0.5 if held_out else 1.0),
            1 if held_out else queries_per_doc,
            negatives,
        )
        path = out / f"{split}.jsonl"
        with path.open("w") as f:
            for ex in examples:
                f.write(json.dumps(ex, sort_keys=True) + "\n")
        counts[split] = len(examples)
    return counts
