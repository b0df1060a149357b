"""The parameter map: HF -> grc -> HF is exact, for every family and layout."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from grc_jax.convert.param_map import (
    PARAM_MAPS,
    TRANSFORMS,
    expected_hf_shapes,
    hf_to_params,
    params_to_hf,
)
from grc_jax.core.config import GRCConfig, ModelConfig
from grc_jax.model.transformer import abstract_params

FAMILIES = {
    "llama": dict(family="llama"),
    "qwen2": dict(family="qwen2", qkv_bias=True),
    "qwen3": dict(family="qwen3", qk_norm=True, head_dim=24),
}


def _cfg(family: str, tied: bool, scan: bool = False) -> ModelConfig:
    base = dict(
        vocab_size=50,
        d_model=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        d_ff=40,
        tie_embeddings=tied,
        scan_layers=scan,
    )
    return ModelConfig(**{**base, **FAMILIES[family]})


def _random_hf(cfg: ModelConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in expected_hf_shapes(cfg).items()}


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_exact(family, tied, scan):
    cfg = _cfg(family, tied, scan)
    grc = GRCConfig(num_latents=5)
    hf = _random_hf(cfg)
    params = hf_to_params(hf, cfg, grc)
    # Every param of the model is filled, with the model's own shapes and float32.
    shapes, _ = abstract_params(cfg, grc)
    got = {k: (v.shape, v.dtype) for k, v in _flatten(params).items()}
    want = {k: (v.shape, v.dtype) for k, v in _flatten(shapes).items()}
    assert got == want
    back = params_to_hf(params, cfg)
    assert set(back) == set(hf)
    for name, value in hf.items():
        assert back[name].dtype == np.float32
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_transforms_are_inverse():
    rng = np.random.default_rng(1)
    for name, t in TRANSFORMS.items():
        ours = (
            (6, 3, 4)
            if name in ("heads_in", "heads_out")
            else (3, 4)
            if name != "identity"
            else (5,)
        )
        hf = rng.normal(size=t.hf_shape(ours))
        np.testing.assert_array_equal(t.to_hf(t.to_ours(hf, ours)), hf, err_msg=name)


def test_family_maps_extend_llama():
    llama = set(PARAM_MAPS["llama"].layer_rows)
    assert llama < set(PARAM_MAPS["qwen2"].layer_rows)
    assert llama < set(PARAM_MAPS["qwen3"].layer_rows)


def test_q_kernel_layout():
    """HF q_proj row h*D + j is head h, dim j: grc kernel[:, h, j]."""
    cfg = _cfg("llama", tied=True)
    hf = _random_hf(cfg)
    q = hf["model.layers.1.self_attn.q_proj.weight"]
    o = hf["model.layers.1.self_attn.o_proj.weight"]
    params = hf_to_params(hf, cfg, GRCConfig(num_latents=2))
    kernel = np.asarray(params["layers_1"]["attn"]["q"]["kernel"])
    np.testing.assert_array_equal(kernel[:, 2, 5], q[2 * cfg.head_dim + 5])
    o_kernel = np.asarray(params["layers_1"]["attn"]["o"]["kernel"])
    np.testing.assert_array_equal(o_kernel[3, 1], o[:, 3 * cfg.head_dim + 1])


def test_latent_init():
    cfg = _cfg("llama", tied=True)
    hf = _random_hf(cfg)
    mean = hf["model.embed_tokens.weight"].mean(axis=0)
    grc = GRCConfig(num_latents=64, latent_init="mean_embedding", latent_init_noise=0.01)
    lat = np.asarray(hf_to_params(hf, cfg, grc, seed=3)["latents"])
    assert lat.shape == (64, cfg.d_model)
    assert np.abs(lat.mean(axis=0) - mean).max() < 0.01
    assert 0.007 < (lat - mean).std() < 0.013
    again = np.asarray(hf_to_params(hf, cfg, grc, seed=3)["latents"])
    np.testing.assert_array_equal(lat, again)  # seeded
    other = np.asarray(hf_to_params(hf, cfg, grc, seed=4)["latents"])
    assert not np.array_equal(lat, other)
    normal = dataclasses.replace(grc, latent_init="normal")
    lat = np.asarray(hf_to_params(hf, cfg, normal)["latents"])
    assert abs(lat.mean()) < 0.01 and 0.015 < lat.std() < 0.025  # N(0, init_std=0.02)


def test_map_must_match_config_flags():
    cfg = dataclasses.replace(_cfg("llama", tied=True), qk_norm=True)  # not in the Llama map
    with pytest.raises(ValueError, match="llama parameter map does not match"):
        expected_hf_shapes(cfg)


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        out.update(_flatten(v, path) if isinstance(v, dict) else {path: v})
    return out
