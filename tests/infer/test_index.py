"""`load_index` and `search` on malformed input: every case is an `IndexFormatError` (or a
`UsageError` for a bad query) naming the file and what is wrong, never a traceback or NaN scores."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from grc_jax.core.errors import IndexFormatError, UsageError
from grc_jax.infer.index import MEMORIES_FORMAT, build_index, load_index, search
from tests.infer.conftest import DOCS


@pytest.fixture(scope="module")
def built(engine, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "idx"
    build_index(engine, DOCS, out)
    return out


@pytest.fixture
def idx(built, tmp_path):
    """A fresh copy of the built index, to damage."""
    return shutil.copytree(built, tmp_path / "idx")


def _edit_json(idx, change):
    meta = json.loads((idx / "index.json").read_text())
    change(meta)
    (idx / "index.json").write_text(json.dumps(meta))


def _pop(key):
    return lambda m: m.pop(key)


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def test_the_built_index_loads(built):
    index = load_index(built)
    assert index.texts == DOCS and index.embeddings.dtype == np.float32
    assert len(index.memories([2, 0])) == 2


@pytest.mark.parametrize(
    "change, message",
    [
        (_pop("texts"), "no 'texts' key"),
        (_set("texts", "the cat sat"), "'texts' should be a list of document texts"),
        (_set("texts", ["a", 7, "b"]), r"texts\[1\] should be a string, got 7"),
        (_set("texts", ["a", "b"]), "2 texts but count=3"),
        (_pop("model"), "no 'model' key"),
        (_set("model", 12), "'model' should be a model fingerprint"),
        (_set("count", "3"), "'count' should be a positive integer, got '3'"),
        (_set("dim", True), "'dim' should be a positive integer, got True"),
        (_set("num_latents", 0), "'num_latents' should be a positive integer, got 0"),
        (_set("memory_mode", "both"), "'memory_mode' should be one of"),
        (_set("format", "grc-index/9"), "format is 'grc-index/9'"),
        (lambda m: m.clear(), "format is None"),
    ],
)
def test_malformed_index_json_is_named(idx, change, message):
    _edit_json(idx, change)
    with pytest.raises(IndexFormatError, match=message) as e:
        load_index(idx)
    assert "index.json" in str(e.value)


def test_index_json_that_is_not_an_object(idx):
    (idx / "index.json").write_text("[1, 2]")
    with pytest.raises(IndexFormatError, match=r"index\.json.*expected a JSON object, got list"):
        load_index(idx)
    (idx / "index.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(IndexFormatError, match=r"index\.json.*not valid JSON"):
        load_index(idx)


def _save_npy(value):
    return lambda path: np.save(path, value, allow_pickle=True)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _with_row(value):
    def change(path):
        emb = np.load(path)
        emb[1, 3] = value
        np.save(path, emb)

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (_save_npy(np.array([{"a": 1}] * 3, dtype=object)), "pickled data is never loaded"),
        (lambda p: p.write_bytes(pickle.dumps({"rows": [1.0]})), "pickled data is never loaded"),
        (_truncate, "not a plain numeric .npy array"),
        (lambda p: p.write_bytes(b""), "cannot be read|not a plain numeric"),
        (_save_npy(np.zeros((3, 32), np.int64)), "dtype int64, expected float32"),
        (_save_npy(np.zeros((3, 5), np.float32)), r"shape \(3, 5\) does not match"),
        (_with_row(np.nan), r"1 embedding\(s\) hold NaN or inf \(first: row 1\)"),
        (_with_row(np.inf), r"NaN or inf \(first: row 1\)"),
    ],
)
def test_malformed_embeddings_are_named(idx, change, message):
    change(idx / "embeddings.npy")
    with pytest.raises(IndexFormatError, match=message) as e:
        load_index(idx)
    assert "embeddings.npy" in str(e.value)


def _rewrite_memories(drop=(), meta=None, resize=None):
    def change(path):
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
            st = f.metadata()
        if resize:
            tensors[resize] = tensors[resize][:2]
        save_file(tensors, str(path), meta if meta is not None else st)

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (_truncate, "not a readable safetensors file"),
        (lambda p: p.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad"), "not a readable"),
        (_rewrite_memories(drop=("v",)), r"no tensor\(s\) \['v'\]"),
        (_rewrite_memories(meta={"format": MEMORIES_FORMAT, "model": "x"}), "does not belong"),
        (_rewrite_memories(resize="k"), r"k \(2, 2, 4, 2, 8\) / v \(3, 2, 4, 2, 8\) do not match"),
        (_rewrite_memories(resize="source_tokens"), r"source_tokens shape \(2,\), expected \(3,\)"),
    ],
)
def test_malformed_memories_are_named(idx, change, message):
    change(idx / "memories.safetensors")
    with pytest.raises(IndexFormatError, match=message) as e:
        load_index(idx)
    assert "memories.safetensors" in str(e.value)


def test_memories_damaged_after_loading(idx):
    index = load_index(idx)
    _truncate(idx / "memories.safetensors")
    with pytest.raises(IndexFormatError, match=r"memories\.safetensors.*cannot be read"):
        index.memories([0])
    with pytest.raises(UsageError, match="no document 3"):
        index.memories([3])


def test_search_refuses_non_finite_queries(built):
    index = load_index(built)
    q = index.embeddings[:2].copy()
    scores, ids = search(index, q, k=1)
    assert np.isfinite(scores).all() and ids[:, 0].tolist() == [0, 1]
    q[1, 0] = np.nan
    with pytest.raises(UsageError, match="search: query embedding 1 holds NaN or inf"):
        search(index, q, k=1)
    with pytest.raises(UsageError, match="query embedding 0"):
        search(index, np.full(q.shape[1], np.inf), k=1)
