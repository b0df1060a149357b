"""Shared data fixtures: a seeded synthetic corpus and a small sentencepiece model trained on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grc_jax.core.config import load_config
from grc_jax.data.synth import synthesize
from grc_jax.data.tokenizer import train_sentencepiece

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def record_texts(records: list[dict]) -> list[str]:
    """The texts a tokenizer for these records must cover (as `grc tokenizer train` reads them)."""
    texts: list[str] = []
    for r in records:
        texts += [
            r["query"],
            r["reasoning"],
            f"answer : {r['answer']}",
            r["positive"],
            *r["negatives"],
        ]
    return texts


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """train/validation/test JSONL of the synthetic corpus, seed 0 (read-only: do not modify)."""
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, seed=0)
    return out


@pytest.fixture(scope="session")
def train_records(synth_dir) -> list[dict]:
    return read_jsonl(synth_dir / "train.jsonl")


@pytest.fixture(scope="session")
def sp_tok(tmp_path_factory, train_records):
    """A 1024-piece sentencepiece model trained on the synthetic train split."""
    out = tmp_path_factory.mktemp("tok") / "sp"
    return train_sentencepiece(record_texts(train_records), out, vocab_size=1024)


@pytest.fixture(scope="session")
def unique_records(train_records) -> list[dict]:
    """Synthetic train records with pairwise distinct queries (so a query names its record)."""
    seen: set[str] = set()
    out = []
    for r in train_records:
        if r["query"] not in seen:
            seen.add(r["query"])
            out.append(r)
    return out


def tiny_config(*overrides: str):
    """configs/tiny.yaml with a small batch (4 rows of 256 tokens) plus `overrides`."""
    return load_config(TINY_CONFIG, ["data.batch_size=4", "data.seq_len=256", *overrides])


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
