"""Hugging Face `config.json` (Llama / Qwen2 / Qwen3) <-> grc `ModelConfig`.

Both RoPE spellings are read:

* transformers 5.x: `rope_parameters: {rope_type, rope_theta, factor, low_freq_factor, ...}`
  (possibly nested per attention layer type, e.g. `{"full_attention": {...}}`);
* transformers 4.x: top-level `rope_theta` plus an optional `rope_scaling` dict whose type is
  under `rope_type` (or the older `type`).

Values inside `rope_parameters` win over `rope_scaling`, which wins over top-level keys, as in
transformers. Only the `default` and `llama3` RoPE types exist in grc's model; anything else
(`linear`, `dynamic`, `yarn`, `longrope`, partial rotary) is refused with an `ImportModelError`
(a `ValueError`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from grc_jax.core.config import ModelConfig, RopeScalingConfig
from grc_jax.core.errors import ImportModelError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "llama3")

# transformers' per-family defaults for keys a config.json may leave out.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "head_dim": None},
    "qwen2": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "head_dim": None},
    # Qwen3Config's `head_dim` defaults to 128, not hidden_size // num_attention_heads.
    "qwen3": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "head_dim": 128},
}
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor")


def _err(key: str, value: Any, what: str) -> ImportModelError:
    return ImportModelError(f"HF config key '{key}' = {value!r}: {what}")


def _flat_rope_parameters(hf: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The one RoPE dict of a config (merged over the two spellings) and the key it came from."""
    merged: dict[str, Any] = {}
    source = "rope_parameters"
    legacy = hf.get("rope_scaling")
    if legacy is not None:
        if not isinstance(legacy, Mapping):
            raise _err("rope_scaling", legacy, "expected a mapping or null")
        merged.update(legacy)
        source = "rope_scaling"
    params = hf.get("rope_parameters")
    if params is not None:
        if not isinstance(params, Mapping):
            raise _err("rope_parameters", params, "expected a mapping or null")
        layer_types = set(hf.get("layer_types") or ()) | {"full_attention", "sliding_attention"}
        nested = [k for k in params if k in layer_types]
        if nested:  # per-layer-type RoPE: fine as long as every layer type uses the same one
            distinct = {
                repr(sorted(dict(params[k]).items())) for k in nested if params[k] is not None
            }
            if len(distinct) > 1:
                raise _err(
                    "rope_parameters",
                    dict(params),
                    "a different RoPE per layer type is not supported",
                )
            params = next(params[k] for k in nested if params[k] is not None)
        merged.update(params)
        source = "rope_parameters"
    return merged, source


def _rope(hf: Mapping[str, Any], max_pos: int) -> tuple[float, RopeScalingConfig | None]:
    rope, source = _flat_rope_parameters(hf)
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if theta is None:
        theta = 10000.0
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise _err("partial_rotary_factor", partial, "partial rotary embeddings are not supported")
    type_key = "rope_type" if "rope_type" in rope else "type"
    rope_type = rope.get(type_key, "default") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise _err(
            f"{source}.{type_key}",
            rope_type,
            f"unsupported RoPE type; supported: {', '.join(SUPPORTED_ROPE_TYPES)}",
        )
    if rope_type == "default":
        return float(theta), None
    for key in _LLAMA3_KEYS:
        if rope.get(key) is None:
            raise _err(f"{source}.{key}", None, "required for rope_type 'llama3'")
    original = rope.get("original_max_position_embeddings")
    if original is None:  # transformers falls back to max_position_embeddings
        original = hf.get("original_max_position_embeddings", max_pos)
    scaling = RopeScalingConfig(
        rope_type="llama3",
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(original),
    )
    scaling.validate(source)
    return float(theta), scaling


def _check_unsupported(hf: Mapping[str, Any], family: str) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _err("hidden_act", act, "only 'silu' (SwiGLU) MLPs are supported")
    if hf.get("mlp_bias"):
        raise _err("mlp_bias", True, "MLP biases are not supported by grc's model")
    if family in ("llama", "qwen3") and hf.get("attention_bias"):
        # Here transformers puts a bias on q/k/v *and* o_proj; grc's attention has no o bias.
        raise _err(
            "attention_bias",
            True,
            f"{family} with attention_bias also has an o_proj bias, which grc's model lacks",
        )
    if hf.get("use_sliding_window"):
        raise _err("use_sliding_window", True, "sliding-window attention is not supported")
    layer_types = hf.get("layer_types") or ()
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        raise _err("layer_types", other, "only 'full_attention' layers are supported")
    tp = hf.get("pretraining_tp", 1)
    if tp not in (None, 1):
        raise _err("pretraining_tp", tp, "only 1 is supported")


def model_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """A `ModelConfig` from a HF `config.json` dict; `overrides` set other fields (dtype, ...)."""
    family = hf.get("model_type")
    if family not in SUPPORTED_MODEL_TYPES:
        raise _err("model_type", family, f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    for key in _REQUIRED:
        if not isinstance(hf.get(key), int) or isinstance(hf.get(key), bool):
            raise _err(key, hf.get(key), f"an integer is required for model_type {family!r}")
    _check_unsupported(hf, family)
    defaults = _FAMILY_DEFAULTS[family]
    n_heads = hf["num_attention_heads"]
    n_kv_heads = hf.get("num_key_value_heads") or n_heads
    head_dim = hf.get("head_dim") or defaults["head_dim"] or hf["hidden_size"] // n_heads
    max_pos = int(hf.get("max_position_embeddings") or defaults["max_position_embeddings"])
    theta, scaling = _rope(hf, max_pos)
    eps = hf.get("rms_norm_eps")
    fields = dict(
        family=family,
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        d_ff=hf["intermediate_size"],
        rms_norm_eps=float(eps if eps is not None else defaults["rms_norm_eps"]),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",  # Qwen2 always has q/k/v biases (transformers hard-codes it)
        qk_norm=family == "qwen3",
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    fields.update(overrides)
    cfg = ModelConfig(**fields)
    cfg.validate("model")
    return cfg


def hf_config_from_model(cfg: ModelConfig) -> dict[str, Any]:
    """The inverse: a transformers-5 style `config.json` dict for `cfg` (for export)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope.update(dataclasses.asdict(cfg.rope_scaling))
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    out: dict[str, Any] = {
        "architectures": [arch[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
    }
    if cfg.family in ("llama", "qwen3"):
        out["attention_bias"] = False
    if cfg.family == "llama":
        out["mlp_bias"] = False
    return out
