"""Config loading: YAML files, overrides, and errors that name the bad key."""

from pathlib import Path

import pytest

from grc_jax.core.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    parse_override,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Published HF config.json values of the real architectures (hidden_size, layers, heads, ...).
PUBLISHED = {
    "smollm2_135m": dict(
        vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
        d_ff=1536, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
        tie_embeddings=True, qk_norm=False, qkv_bias=False, family="llama",
    ),
    "qwen3_0_6b": dict(
        vocab_size=151936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
        d_ff=3072, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
        tie_embeddings=True, qk_norm=True, qkv_bias=False, family="qwen3",
    ),
    "llama3_8b": dict(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
        d_ff=14336, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
        tie_embeddings=False, qk_norm=False, qkv_bias=False, family="llama", rope_scaling=None,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", ["tiny", "smollm2_135m", "qwen3_0_6b", "llama3_8b"])
def test_bundled_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, Config)
    for key, value in PUBLISHED.get(name, {}).items():
        assert getattr(cfg.model, key) == value, key


def test_overrides_apply_and_parse_yaml_values():
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        ["model.n_layers=2", "grc.memory_mode=recurrent", "grc.projection_dim=32",
         "train.learning_rate=1e-4", "model.scan_layers=true", "grc.loss_weights.rep=0.5"],
    )  # fmt: skip
    assert cfg.model.n_layers == 2
    assert cfg.grc.memory_mode == "recurrent"
    assert cfg.grc.projection_dim == 32
    assert cfg.train.learning_rate == 1e-4
    assert cfg.model.scan_layers is True
    assert cfg.grc.loss_weights.rep == 0.5


def test_rope_scaling_section_builds():
    cfg = config_from_dict(
        {"model": {"rope_scaling": {"factor": 8.0, "original_max_position_embeddings": 64}}}
    )
    assert cfg.model.rope_scaling.factor == 8.0
    assert cfg.model.rope_scaling.original_max_position_embeddings == 64


@pytest.mark.parametrize(
    "data, overrides, needle",
    [
        ({"model": {"d_modle": 4}}, [], "unknown config key 'model.d_modle'"),
        ({"modle": {}}, [], "unknown config key 'modle'"),
        ({}, ["grc.num_latens=4"], "unknown config key 'grc.num_latens'"),
        ({}, ["grc.memory_mode=sideways"], "'grc.memory_mode': expected one of 'independent'"),
        ({}, ["model.n_layers=two"], "'model.n_layers': expected an integer"),
        ({}, ["model.n_layers=2.5"], "'model.n_layers': expected an integer"),
        ({}, ["model.tie_embeddings=3"], "'model.tie_embeddings': expected a boolean"),
        ({}, ["model.n_kv_heads=3"], "'model.n_kv_heads': expected a divisor of n_heads=4"),
        ({}, ["model.head_dim=-2"], "'model.head_dim': expected a positive integer"),
        ({}, ["grc.temperature=0"], "'grc.temperature': expected a positive number"),
        ({}, ["grc.loss_weights.gen=-1"], "'grc.loss_weights.gen': expected a non-negative"),
        ({}, ["mesh.data=-1", "mesh.fsdp=-1"], "at most one axis set to -1"),
        ({}, ["model=3"], "'model': expected a mapping"),
        ({}, ["model.n_layers.x=3"], "'model.n_layers': expected an integer"),
        ({"model": {"n_layers": 2}}, ["model.n_layers.x=3"], "'model.n_layers' is not a section"),
        ({}, ["no_equals_sign"], "expected the form section.key=value"),
        ({"model": {"rope_scaling": {"factr": 2}}}, [], "'model.rope_scaling.factr'"),
    ],
)
def test_bad_keys_and_values_name_the_key(data, overrides, needle):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, overrides)
    assert needle in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'train.stpes'"):
        load_config(typo)


def test_save_load_roundtrip(tmp_path):
    cfg = load_config(CONFIGS / "llama3_8b.yaml", ["model.rope_scaling={factor: 8.0}"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_parse_override_values():
    assert parse_override("a.b=1.5e-3") == (["a", "b"], 1.5e-3)
    assert config_from_dict({}, ["train.learning_rate=1e-3"]).train.learning_rate == 1e-3
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
