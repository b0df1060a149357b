"""HF import parity: tiny random Llama / Qwen2 / Qwen3 torch models vs grc's forward pass."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from grc_jax.checkpoints import load_imported
from grc_jax.cli import main as grc_main
from grc_jax.convert.hf_config import hf_config_from_model, model_config_from_hf
from grc_jax.convert.hf_import import import_checkpoint, load_hf_dir
from grc_jax.convert.param_map import expected_hf_shapes, hf_to_params
from grc_jax.core.batch import Rows
from grc_jax.core.config import Config, GRCConfig
from grc_jax.core.errors import ImportModelError
from grc_jax.model.transformer import forward

BATCH, LENGTH, VOCAB = 2, 12, 128
TOL = 1e-4
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # small, so the scaling changes RoPE at these positions
}
CASES = {
    "llama_gqa_untied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_mha_tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama_llama3_rope": (
        "llama",
        dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE, max_position_embeddings=256),
    ),
    "qwen2_gqa_tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3_gqa_untied": (
        "qwen3",
        dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
    ),
    "qwen3_mha_tied": ("qwen3", dict(num_key_value_heads=4, head_dim=16, tie_word_embeddings=True)),
}
CONFIG_CLASSES = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
}
MODEL_CLASSES = {
    "llama": transformers.LlamaForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "qwen3": transformers.Qwen3ForCausalLM,
}


def make_hf_model(family: str, extra: dict, path, seed: int = 0):
    """A tiny random HF model with non-trivial norm weights and biases, saved to `path`."""
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        rms_norm_eps=1e-5,
        initializer_range=0.08,
        attn_implementation="eager",
    )
    config = CONFIG_CLASSES[family](**{**kwargs, **extra})
    model = MODEL_CLASSES[family](config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def batch(seed: int = 1, offset: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    positions = np.broadcast_to(offset + np.arange(LENGTH, dtype=np.int32), tokens.shape)
    return tokens, np.ascontiguousarray(positions)


def hf_logits(model, tokens, positions) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(tokens.astype(np.int64)),
            position_ids=torch.from_numpy(positions.astype(np.int64)),
        )
    return out.logits.float().numpy()


def grc_logits(params, cfg, tokens, positions) -> np.ndarray:
    ones = jnp.ones(tokens.shape, jnp.int32)
    inputs = Rows(
        tokens=jnp.asarray(tokens),
        segment_ids=ones,
        block_ids=jnp.zeros_like(ones),
        roles=ones,  # TEXT
        positions=jnp.asarray(positions),
    )
    return np.asarray(forward(params, cfg.model, cfg.grc, inputs).logits)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_llama")
    model = make_hf_model(*CASES["llama_gqa_untied"], path)
    tokens, positions = batch()
    return path, hf_logits(model, tokens, positions)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    family, extra = CASES[case]
    model = make_hf_model(family, extra, tmp_path / "hf")
    cfg = import_checkpoint(tmp_path / "hf", tmp_path / "out", {"num_latents": 4})
    assert cfg.model.family == family
    assert cfg.model.tie_embeddings == bool(extra.get("tie_word_embeddings", False))
    assert cfg.grc.latent_init == "mean_embedding"
    loaded_cfg, params = load_imported(tmp_path / "out")
    assert loaded_cfg == cfg
    offset = 40 if "rope_parameters" in extra else 3
    tokens, positions = batch(offset=offset)
    want = hf_logits(model, tokens, positions)
    got = grc_logits(params, cfg, tokens, positions)
    assert np.abs(want).max() > 0.1  # a model whose logits say something
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_llama3_scaling_matters(tmp_path):
    """The llama3 case would fail without scaling: the check above is not vacuous."""
    family, extra = CASES["llama_llama3_rope"]
    model = make_hf_model(family, extra, tmp_path / "hf")
    cfg = model_config_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()))
    assert cfg.rope_scaling is not None and cfg.rope_scaling.original_max_position_embeddings == 16
    grc = GRCConfig(num_latents=2)
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    unscaled = dataclasses.replace(cfg, rope_scaling=None)
    params = hf_to_params(tensors, unscaled, grc)
    tokens, positions = batch(offset=40)
    got = grc_logits(params, Config(model=unscaled, grc=grc), tokens, positions)
    assert np.abs(got - hf_logits(model, tokens, positions)).max() > 10 * TOL


def test_transformers4_config_style(tmp_path):
    """`rope_theta` + `rope_scaling` at the top level (transformers 4.x) reads the same."""
    family, extra = CASES["llama_llama3_rope"]
    config = CONFIG_CLASSES[family](
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **extra
    )
    config.save_pretrained(tmp_path)
    new = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in new and "rope_theta" in new["rope_parameters"]
    old = dict(new)
    rope = dict(old.pop("rope_parameters"))
    old["rope_theta"] = rope.pop("rope_theta")
    old["rope_scaling"] = rope
    assert model_config_from_hf(old) == model_config_from_hf(new)
    old["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in rope.items()}
    assert model_config_from_hf(old) == model_config_from_hf(new)
    # And a plain RoPE Qwen2 config in both spellings.
    plain = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=4
    ).to_dict()
    legacy = {k: v for k, v in plain.items() if k != "rope_parameters"}
    legacy.update(rope_theta=plain["rope_parameters"]["rope_theta"], rope_scaling=None)
    assert model_config_from_hf(legacy) == model_config_from_hf(plain)
    # transformers reads our exported config back to the same ModelConfig.
    cfg = model_config_from_hf(new)
    exported = hf_config_from_model(cfg)
    assert model_config_from_hf(exported) == cfg
    rt = transformers.AutoConfig.for_model(**exported).to_dict()
    assert model_config_from_hf(rt) == cfg


def test_cli_end_to_end(llama_dir, tmp_path, capsys):
    src, want = llama_dir
    out = tmp_path / "imported"
    assert grc_main(["import-hf", str(src), str(out), "--num-latents", "3", "--seed", "7"]) == 0
    summary = capsys.readouterr().out
    assert "llama" in summary and "2 layers" in summary and str(out) in summary
    for name in ("config.yaml", "params", "import_info.json", "import_info.json"):
        assert (out / name).exists()
    info = json.loads((out / "import_info.json").read_text())
    assert info["format"] == "safetensors" and info["family"] == "llama"
    assert info["files"][0]["name"] == "model.safetensors" and len(info["files"][0]["sha256"]) == 64
    cfg, params = load_imported(out)
    assert cfg.grc.num_latents == 3 and cfg.train.run_name == "imported-grc"
    assert params["latents"].shape == (3, 64)
    tokens, positions = batch()
    np.testing.assert_allclose(grc_logits(params, cfg, tokens, positions), want, rtol=0, atol=TOL)
    # A second import into the now non-empty directory is refused, unless forced.
    assert grc_main(["import-hf", str(src), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert grc_main(["import-hf", str(src), str(out), "--force"]) == 0


def test_scan_layers_import(llama_dir, tmp_path):
    src, want = llama_dir
    cfg = import_checkpoint(src, tmp_path / "out", model_overrides={"scan_layers": True})
    assert cfg.model.scan_layers
    cfg, params = load_imported(tmp_path / "out")
    assert "layers" in params and "layers_0" not in params
    assert params["layers"]["attn"]["q"]["kernel"].shape == (2, 64, 4, 16)
    tokens, positions = batch()
    np.testing.assert_allclose(grc_logits(params, cfg, tokens, positions), want, rtol=0, atol=TOL)


def test_sharded_and_bfloat16_checkpoints(tmp_path):
    """A sharded checkpoint (index.json) and a bfloat16 one read as the same tensors."""
    model = make_hf_model(*CASES["qwen2_gqa_tied"], tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _, one, _ = load_hf_dir(tmp_path / "one")
    _, sharded, files = load_hf_dir(tmp_path / "sharded")
    assert len(files) > 1 and set(sharded) == set(one)
    for name, value in one.items():
        np.testing.assert_array_equal(sharded[name], value, err_msg=name)
    _, bf16, _ = load_hf_dir(tmp_path / "bf16")
    for name, param in model.state_dict().items():
        if name in bf16:
            assert bf16[name].dtype.name == "bfloat16"
            want = param.float().numpy()
            np.testing.assert_array_equal(bf16[name].astype(np.float32), want, err_msg=name)
    cfg = import_checkpoint(tmp_path / "bf16", tmp_path / "out", {"num_latents": 2})
    _, params = load_imported(tmp_path / "out")
    want = model.state_dict()["model.layers.1.self_attn.k_proj.bias"].float().numpy()
    np.testing.assert_array_equal(params["layers_1"]["attn"]["k"]["bias"].reshape(-1), want)
    assert cfg.model.qkv_bias


# ---------------------------------------------------------------------------------------------
# Errors


def _tensors(cfg):
    rng = np.random.default_rng(0)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in expected_hf_shapes(cfg).items()}


def _tiny_cfg(**kw):
    hf = dict(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return model_config_from_hf({**hf, **kw})


def test_shape_mismatch_names_tensor():
    cfg = _tiny_cfg()
    tensors = _tensors(cfg)
    tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((48, 64), np.float32)
    with pytest.raises(
        ValueError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight'.*\(48, 64\).*\(32, 64\)"
    ):
        hf_to_params(tensors, cfg, GRCConfig())


def test_missing_and_unexpected_tensors_named():
    cfg = _tiny_cfg()
    tensors = _tensors(cfg)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(
        ValueError, match=r"missing 1 tensor.*'model\.layers\.0\.mlp\.up_proj\.weight'"
    ):
        hf_to_params(tensors, cfg, GRCConfig())
    tensors = _tensors(cfg)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)  # harmless
    hf_to_params(tensors, cfg, GRCConfig())
    tensors["model.layers.0.mlp.extra.weight"] = np.ones(3, np.float32)
    with pytest.raises(
        ValueError, match=r"unexpected tensor.*'model\.layers\.0\.mlp\.extra\.weight'"
    ):
        hf_to_params(tensors, cfg, GRCConfig())


def test_tied_lm_head_must_equal_embedding():
    cfg = _tiny_cfg(tie_word_embeddings=True)
    tensors = _tensors(cfg)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    hf_to_params(tensors, cfg, GRCConfig())
    tensors["lm_head.weight"][0, 0] += 1.0
    with pytest.raises(ValueError, match="lm_head.weight"):
        hf_to_params(tensors, cfg, GRCConfig())


@pytest.mark.parametrize(
    "change, pattern",
    [
        (dict(model_type="mistral"), r"'model_type' = 'mistral'.*llama, qwen2, qwen3"),
        (
            dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}),
            r"'rope_parameters\.rope_type' = 'yarn'.*default, llama3",
        ),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), r"'rope_scaling\.type' = 'linear'"),
        (dict(mlp_bias=True), r"'mlp_bias'"),
        (dict(attention_bias=True), r"'attention_bias'.*o_proj"),
        (dict(hidden_act="gelu"), r"'hidden_act' = 'gelu'"),
        (dict(hidden_size=None), r"'hidden_size' = None"),
    ],
)
def test_unsupported_config_named(change, pattern):
    with pytest.raises(ValueError, match=pattern):
        _tiny_cfg(**change)


def test_defaults():
    cfg = _tiny_cfg(num_key_value_heads=None)
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling) == (
        4,
        16,
        10000.0,
        None,
    )
    qwen2 = _tiny_cfg(model_type="qwen2")
    assert qwen2.qkv_bias and not qwen2.qk_norm
    qwen3 = _tiny_cfg(model_type="qwen3", head_dim=32)
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim == 32


def test_import_errors_name_paths(tmp_path, llama_dir):
    src, _ = llama_dir
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_checkpoint(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files in .*" + tmp_path.name):
        import_checkpoint(tmp_path, tmp_path / "out")
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(ValueError, match=r"cannot read safetensors file .*model\.safetensors"):
        import_checkpoint(tmp_path, tmp_path / "out")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        import_checkpoint(src, busy)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        import_checkpoint(tmp_path / "nope.gguf", tmp_path / "out2")


def _sharded_dir(path, src, weight_map):
    """A HF directory: src's config.json and weights, with an index naming `weight_map`."""
    path.mkdir()
    (path / "config.json").write_text((src / "config.json").read_text())
    (path / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


@pytest.mark.parametrize(
    "entry, message",
    [
        ("../other/model.safetensors", "points outside the model directory"),
        ("sub/../../other/model.safetensors", "points outside the model directory"),
        ("{other}/model.safetensors", "is an absolute path"),
        ("link/model.safetensors", "is in a directory that resolves elsewhere"),
        (7, "is not a file name"),
    ],
)
def test_weight_map_entries_stay_inside_the_model_dir(tmp_path, llama_dir, entry, message):
    src, _ = llama_dir
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    if isinstance(entry, str):
        entry = entry.format(other=other)
    model = _sharded_dir(tmp_path / "model", src, {"lm_head.weight": entry})
    (model / "link").symlink_to(other)
    with pytest.raises(ImportModelError, match=message) as e:
        load_hf_dir(model)
    assert repr(entry) in str(e.value) and "model.safetensors.index.json" in str(e.value)


def test_weight_map_outside_entry_refused_by_cli(tmp_path, llama_dir, capsys):
    src, _ = llama_dir
    model = _sharded_dir(tmp_path / "model", src, {"lm_head.weight": "../x/model.safetensors"})
    assert grc_main(["import-hf", str(model), str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("grc import-hf: error: ")
    assert "weight_map entry '../x/model.safetensors' points outside" in err[0]
    assert not (tmp_path / "out").exists()


def test_weight_map_files_may_be_symlinks(tmp_path, llama_dir):
    """The Hugging Face cache links a snapshot's files to its blobs/: a file (not a directory on
    the way) that is a symlink out of the model directory is read."""
    src, _ = llama_dir
    model = _sharded_dir(tmp_path / "model", src, {})
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").symlink_to(src / "model.safetensors")
    _, tensors, _ = load_hf_dir(src)
    index = {"weight_map": {name: "./model.safetensors" for name in tensors}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    _, got, files = load_hf_dir(model)
    assert files == [model / "model.safetensors"] and set(got) == set(tensors)
