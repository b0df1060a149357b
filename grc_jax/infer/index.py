"""An on-disk corpus index for retrieval and RAG: one `compress` pass per document.

`build_index` writes, under one directory:

- `index.json`: `format` (`grc-index/1`), `model` (the fingerprint of the model that built it),
  `num_latents`, `memory_mode`, `dim`, `count` and `texts` (row i is `texts[i]`);
- `embeddings.npy`: float32 `[count, dim]` unit-norm document embeddings;
- `memories.safetensors`: `k`, `v` float32 `[count, n_layers, K, n_kv_heads, head_dim]` (keys
  canonical, as in `LatentMemory`) and `source_tokens` int64 `[count]`; its metadata repeats
  format (`grc-index-memories/1`), model, K and memory mode.

Memories are stacked in one file so that a search reads only the rows of the retrieved documents
(safetensors slices) instead of opening thousands of files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from grc_jax.core.constants import check_memory_reads
from grc_jax.core.errors import (
    IndexFormatError,
    IndexMismatchError,
    MissingPathError,
    UsageError,
)
from grc_jax.infer.memory import LatentMemory
from grc_jax.infer.sampling import SamplingParams

FORMAT = "grc-index/1"
MEMORIES_FORMAT = "grc-index-memories/1"


@dataclasses.dataclass(frozen=True)
class Index:
    """A loaded index: texts and embeddings in memory, memories read on demand."""

    directory: Path
    model: str
    num_latents: int
    memory_mode: str
    texts: list[str]
    embeddings: np.ndarray  # [n, dim] float32, unit norm

    def __len__(self) -> int:
        return len(self.texts)

    def memories(self, ids: list[int]) -> list[LatentMemory]:
        """The latent memories of documents `ids` (only those rows are read)."""
        from safetensors import safe_open

        out = []
        with safe_open(str(self.directory / "memories.safetensors"), framework="numpy") as f:
            k, v, n = f.get_slice("k"), f.get_slice("v"), f.get_tensor("source_tokens")
            for i in ids:
                out.append(
                    LatentMemory(
                        k=np.asarray(k[i : i + 1])[0], v=np.asarray(v[i : i + 1])[0],
                        model=self.model, num_latents=self.num_latents,
                        memory_mode=self.memory_mode, source_tokens=int(n[i]),
                    )
                )  # fmt: skip
        return out


@dataclasses.dataclass(frozen=True)
class Hit:
    id: int
    score: float
    text: str


@dataclasses.dataclass(frozen=True)
class RagResult:
    question: str
    hits: list[Hit]
    answer: str
    finish_reason: str
    tokens: list[int]


def build_index(engine: Any, docs: list[str], out_dir: str | Path) -> Index:
    """Embed and compress every document (one pass each) and write the index to `out_dir`.

    Args:
      engine: a `grc_jax.infer.engine.Engine`.
      docs: the document texts; row i of the index is `docs[i]`.
    """
    from safetensors.numpy import save_file

    if not docs:
        raise IndexFormatError("build_index: no documents")
    for i, d in enumerate(docs):
        if not isinstance(d, str) or not d.strip():
            raise IndexFormatError(f"build_index: document {i} is empty ({d!r})")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise IndexFormatError(f"index output {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "index.json").is_file():
        raise IndexFormatError(
            f"index output {str(out)!r} is a non-empty directory that holds no index; "
            "choose a new directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)  # an interrupted rebuild leaves no stale index
    pairs = engine.compress(docs)
    emb = np.stack([e for _, e in pairs]).astype(np.float32)
    k = np.stack([m.k for m, _ in pairs]).astype(np.float32)
    v = np.stack([m.v for m, _ in pairs]).astype(np.float32)
    tokens = np.asarray([m.source_tokens for m, _ in pairs], np.int64)
    meta = {
        "format": FORMAT,
        "model": engine.fingerprint,
        "num_latents": engine.K,
        "memory_mode": engine.cfg.grc.memory_mode,
        "dim": int(emb.shape[1]),
        "count": len(docs),
        "texts": list(docs),
    }
    st_meta = {
        "format": MEMORIES_FORMAT,
        "model": engine.fingerprint,
        "num_latents": str(engine.K),
        "memory_mode": engine.cfg.grc.memory_mode,
    }
    save_file({"k": k, "v": v, "source_tokens": tokens}, str(out / "memories.safetensors"), st_meta)
    np.save(out / "embeddings.npy", emb)
    # index.json last: a directory with it is complete.
    (out / "index.json").write_text(json.dumps(meta, indent=1) + "\n")
    return Index(out, engine.fingerprint, engine.K, meta["memory_mode"], list(docs), emb)


def load_index(directory: str | Path) -> Index:
    """Read an index directory written by `build_index` (memories stay on disk until used)."""
    from safetensors import safe_open

    d = Path(directory)
    if not (d / "index.json").is_file():
        raise MissingPathError(f"index {str(d)!r}: no index.json (not an index directory)")
    try:
        meta = json.loads((d / "index.json").read_text())
    except json.JSONDecodeError as e:
        raise IndexFormatError(f"index {str(d / 'index.json')!r}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise IndexFormatError(f"index {str(d)!r}: index.json format is not {FORMAT!r}")
    for name in ("embeddings.npy", "memories.safetensors"):
        if not (d / name).is_file():
            raise IndexFormatError(f"index {str(d)!r}: {name} is missing")
    emb = np.load(d / "embeddings.npy")
    texts = meta["texts"]
    if emb.shape != (meta["count"], meta["dim"]) or len(texts) != meta["count"]:
        raise IndexFormatError(
            f"index {str(d)!r}: embeddings {emb.shape} / {len(texts)} texts do not match "
            f"count={meta['count']} dim={meta['dim']}"
        )
    with safe_open(str(d / "memories.safetensors"), framework="numpy") as f:
        st = f.metadata() or {}
        k_shape = f.get_slice("k").get_shape()
    if st.get("format") != MEMORIES_FORMAT or st.get("model") != meta["model"]:
        raise IndexFormatError(
            f"index {str(d)!r}: memories.safetensors does not belong to index.json"
        )
    if k_shape[0] != meta["count"] or k_shape[2] != meta["num_latents"]:
        raise IndexFormatError(
            f"index {str(d)!r}: memories shape {k_shape} does not match count={meta['count']} "
            f"K={meta['num_latents']}"
        )
    return Index(d, meta["model"], int(meta["num_latents"]), meta["memory_mode"], texts, emb)


def check_index(engine: Any, index: Index) -> None:
    """Refuse an index made by another model (or K / memory mode) than the engine's."""
    if index.num_latents != engine.K or index.memory_mode != engine.cfg.grc.memory_mode:
        raise IndexMismatchError(
            f"index {str(index.directory)!r} was built with K={index.num_latents}, "
            f"memory_mode={index.memory_mode!r}; this model has K={engine.K}, "
            f"memory_mode={engine.cfg.grc.memory_mode!r}"
        )
    if index.model != engine.fingerprint:
        raise IndexMismatchError(
            f"index {str(index.directory)!r} was built by model {index.model}, but this model is "
            f"{engine.fingerprint}; rebuild the index with this model"
        )


def search(index: Index, query_embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k documents by cosine similarity: (scores `[q, k]`, ids `[q, k]`), best first.

    A 1-D query gives `[k]` arrays. Equal scores keep document order. `k` is capped at the size.
    """
    if k < 1:
        raise UsageError(f"search: k must be at least 1, got {k}")
    q = np.asarray(query_embeddings, np.float32)
    single = q.ndim == 1
    q = q[None] if single else q
    if q.shape[-1] != index.embeddings.shape[1]:
        raise IndexMismatchError(
            f"search: query dim {q.shape[-1]} does not match the index dim "
            f"{index.embeddings.shape[1]}"
        )
    scores = q @ index.embeddings.T
    k = min(k, len(index))
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, ids, axis=1)
    return (top[0], ids[0]) if single else (top, ids)


def rag(
    engine: Any,
    index: Index,
    question: str,
    k: int = 3,
    self_reason: bool = False,
    max_new_tokens: int = 64,
    sampling: SamplingParams | None = None,
) -> RagResult:
    """Retrieve the top-k documents for `question`, then generate over their latent memories.

    The retrieved memories form one consumer block in rank order (best first), followed by the
    question as text; the KV cost is `k * K` tokens whatever the documents' lengths.
    """
    check_index(engine, index)
    check_memory_reads(engine.cfg.grc.memory_mode, k, "rag: this model")
    q = engine.embed([question], self_reason=self_reason)[0]
    scores, ids = search(index, q, k)
    memories = index.memories([int(i) for i in ids])
    g = engine.generate(
        [question], [memories], max_new_tokens=max_new_tokens, sampling=sampling or SamplingParams()
    )[0]
    hits = [Hit(int(i), float(s), index.texts[int(i)]) for s, i in zip(scores, ids)]
    return RagResult(question, hits, g.text, g.finish_reason, g.tokens)
