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

from grc_jax.core.constants import MEMORY_MODES, check_memory_reads
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

        path = self.directory / "memories.safetensors"
        bad = [i for i in ids if not 0 <= i < len(self)]
        if bad:
            raise UsageError(
                f"index {str(self.directory)!r}: no document {bad[0]} (0..{len(self) - 1})"
            )
        out = []
        try:
            with safe_open(str(path), framework="numpy") as f:
                k, v, n = f.get_slice("k"), f.get_slice("v"), f.get_tensor("source_tokens")
                rows = [(np.asarray(k[i : i + 1])[0], np.asarray(v[i : i + 1])[0], int(n[i]))
                        for i in ids]  # fmt: skip
        except Exception as e:  # changed on disk since load_index checked it
            raise IndexFormatError(f"index {str(path)!r}: cannot be read ({e})") from None
        for k_i, v_i, n_i in rows:
            out.append(
                LatentMemory(
                    k=k_i, v=v_i, model=self.model, num_latents=self.num_latents,
                    memory_mode=self.memory_mode, source_tokens=n_i,
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


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_meta(meta: Any, path: Path) -> dict[str, Any]:
    """index.json's fields, each of the type `build_index` writes, else `IndexFormatError`."""
    where = f"index {str(path)!r}"
    if not isinstance(meta, dict):
        raise IndexFormatError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise IndexFormatError(f"{where}: format is {meta.get('format')!r}, not {FORMAT!r}")
    expected = {
        "model": (lambda x: isinstance(x, str) and bool(x), "a model fingerprint (string)"),
        "num_latents": (_positive_int, "a positive integer"),
        "memory_mode": (lambda x: x in MEMORY_MODES, f"one of {MEMORY_MODES}"),
        "dim": (_positive_int, "a positive integer"),
        "count": (_positive_int, "a positive integer"),
        "texts": (lambda x: isinstance(x, list), "a list of document texts"),
    }
    for key, (ok, what) in expected.items():
        if key not in meta:
            raise IndexFormatError(f"{where}: no {key!r} key")
        if not ok(meta[key]):
            raise IndexFormatError(f"{where}: {key!r} should be {what}, got {meta[key]!r:.80}")
    bad = [i for i, t in enumerate(meta["texts"]) if not isinstance(t, str)]
    if bad:
        raise IndexFormatError(
            f"{where}: texts[{bad[0]}] should be a string, got {meta['texts'][bad[0]]!r:.80}"
        )
    if len(meta["texts"]) != meta["count"]:
        raise IndexFormatError(f"{where}: {len(meta['texts'])} texts but count={meta['count']}")
    return meta


def _load_embeddings(path: Path, meta: dict[str, Any]) -> np.ndarray:
    """embeddings.npy as float32 `[count, dim]`, finite; never unpickled."""
    where = f"index {str(path)!r}"
    try:
        emb = np.load(path, allow_pickle=False)
    except ValueError as e:  # pickled data (an object array, or a pickle) is refused
        raise IndexFormatError(
            f"{where}: not a plain numeric .npy array; pickled data is never loaded ({e})"
        ) from None
    except (OSError, EOFError) as e:
        raise IndexFormatError(f"{where}: cannot be read ({e})") from None
    if not isinstance(emb, np.ndarray):  # an .npz archive under the .npy name
        raise IndexFormatError(f"{where}: not a .npy array ({type(emb).__name__})")
    if not np.issubdtype(emb.dtype, np.floating):
        raise IndexFormatError(f"{where}: dtype {emb.dtype}, expected float32")
    if emb.shape != (meta["count"], meta["dim"]):
        raise IndexFormatError(
            f"{where}: shape {emb.shape} does not match index.json count={meta['count']} "
            f"dim={meta['dim']}"
        )
    bad = np.where(~np.isfinite(emb).all(axis=1))[0]
    if len(bad):
        raise IndexFormatError(
            f"{where}: {len(bad)} embedding(s) hold NaN or inf (first: row {int(bad[0])}); "
            "rebuild the index"
        )
    return emb.astype(np.float32, copy=False)


def _check_memories(path: Path, meta: dict[str, Any]) -> None:
    """memories.safetensors is readable, belongs to index.json and holds `count` memories."""
    from safetensors import safe_open

    where = f"index {str(path)!r}"
    try:
        with safe_open(str(path), framework="numpy") as f:
            st = f.metadata() or {}
            names = set(f.keys())
            missing = sorted({"k", "v", "source_tokens"} - names)
            if missing:
                raise IndexFormatError(f"{where}: no tensor(s) {missing}")
            shapes = {n: tuple(f.get_slice(n).get_shape()) for n in ("k", "v", "source_tokens")}
            dtypes = {n: f.get_slice(n).get_dtype() for n in ("k", "v", "source_tokens")}
    except IndexFormatError:
        raise
    except Exception as e:  # safetensors raises several types for truncated or foreign files
        raise IndexFormatError(f"{where}: not a readable safetensors file ({e})") from None
    if st.get("format") != MEMORIES_FORMAT or st.get("model") != meta["model"]:
        raise IndexFormatError(f"{where}: does not belong to index.json (format / model differ)")
    n, k = meta["count"], meta["num_latents"]
    k_shape = shapes["k"]
    if len(k_shape) != 5 or k_shape[0] != n or k_shape[2] != k or shapes["v"] != k_shape:
        raise IndexFormatError(
            f"{where}: k {k_shape} / v {shapes['v']} do not match index.json count={n} K={k} "
            "(expected equal [count, n_layers, K, n_kv_heads, head_dim])"
        )
    if shapes["source_tokens"] != (n,):
        raise IndexFormatError(
            f"{where}: source_tokens shape {shapes['source_tokens']}, expected ({n},)"
        )
    if dtypes["k"] != "F32" or dtypes["v"] != "F32":
        raise IndexFormatError(f"{where}: k / v are {dtypes['k']} / {dtypes['v']}, expected F32")


def load_index(directory: str | Path) -> Index:
    """Read an index directory written by `build_index` (memories stay on disk until used).

    Every malformed part (index.json fields and their types, an unreadable, pickled or non-finite
    `embeddings.npy`, a truncated or foreign `memories.safetensors`, sizes that disagree) raises
    `IndexFormatError` naming the file and what is wrong.
    """
    d = Path(directory)
    if not (d / "index.json").is_file():
        raise MissingPathError(f"index {str(d)!r}: no index.json (not an index directory)")
    try:
        meta = json.loads((d / "index.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexFormatError(f"index {str(d / 'index.json')!r}: not valid JSON ({e})") from None
    meta = _check_meta(meta, d / "index.json")
    for name in ("embeddings.npy", "memories.safetensors"):
        if not (d / name).is_file():
            raise IndexFormatError(f"index {str(d)!r}: {name} is missing")
    emb = _load_embeddings(d / "embeddings.npy", meta)
    _check_memories(d / "memories.safetensors", meta)
    return Index(
        d, meta["model"], meta["num_latents"], meta["memory_mode"], list(meta["texts"]), emb
    )


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
    if q.ndim != 2:
        raise UsageError(f"search: expected query embeddings [dim] or [q, dim], got {q.shape}")
    if q.shape[-1] != index.embeddings.shape[1]:
        raise IndexMismatchError(
            f"search: query dim {q.shape[-1]} does not match the index dim "
            f"{index.embeddings.shape[1]}"
        )
    bad = np.where(~np.isfinite(q).all(axis=1))[0]
    if len(bad):
        raise UsageError(
            f"search: query embedding {int(bad[0])} holds NaN or inf; no document can be ranked "
            "against it"
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
