"""Builders for the evaluation tests: a small BEIR directory and a tiny random model saved as a
`grc import-hf`-style directory (config.yaml, params/, tokenizer.json), so `grc eval` loads it
like any imported model without a training run."""

import json
from pathlib import Path

import jax

from grc_jax.checkpoints import save_params
from grc_jax.core.config import load_config, save_config
from grc_jax.model import init_params
from tests.helpers import TINY_MODEL, word_tokenizer

ROOT = Path(__file__).resolve().parents[2]

CORPUS = {
    "d1": ("velora", "velora is a city . its population is 42 thousand ."),
    "d2": ("dunas", "dunas is a city . its population is 41 thousand ."),
    "d3": ("tirdai", "tirdai is a river . its length is 88 km ."),
    "d4": ("", "nothfar is a river . its length is 89 km ."),
    "d5": ("", "latres has 82 shells ."),
    "d6": ("", "railkel has 38 lamps ."),
}
QUERIES = {
    "q1": "which city has a population of 42 thousand ?",
    "q2": "which river has a length of 88 km ?",
    "q3": "how many shells does latres have ?",
    "q4": "a query without qrels is dropped",
}
QRELS = [("q1", "d1", 1), ("q2", "d3", 2), ("q2", "d4", 0), ("q3", "d5", 1)]


def write_beir(directory: Path) -> Path:
    """A BEIR directory: 6 documents, 4 queries (3 judged), qrels/test.tsv."""
    (directory / "qrels").mkdir(parents=True, exist_ok=True)
    with (directory / "corpus.jsonl").open("w") as f:
        for doc_id, (title, body) in CORPUS.items():
            f.write(json.dumps({"_id": doc_id, "title": title, "text": body}) + "\n")
    with (directory / "queries.jsonl").open("w") as f:
        for qid, q in QUERIES.items():
            f.write(json.dumps({"_id": qid, "text": q}) + "\n")
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in QRELS]
    (directory / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return directory


def vocabulary() -> list[str]:
    words = set()
    for title, body in CORPUS.values():
        words.update(f"{title} {body}".split())
    for q in QUERIES.values():
        words.update(q.split())
    return sorted(words)


def write_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A one-layer random GRC model (tests/helpers.py TINY_MODEL) as an import directory."""
    directory.mkdir(parents=True, exist_ok=True)
    word_tokenizer(directory, vocabulary())
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        [*TINY_MODEL, f"train.seed={seed}", f"data.tokenizer={directory / 'tokenizer.json'}"],
    )
    save_config(cfg, directory / "config.yaml")
    params = jax.jit(lambda key: init_params(cfg.model, cfg.grc, key))(jax.random.key(seed))
    save_params(params, directory / "params")
    return directory
