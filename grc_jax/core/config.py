"""Typed configuration: dataclasses loaded from YAML with `a.b=value` overrides.

Every key is checked at load time: an unknown key, a value of the wrong type or a value out of range
raises `ConfigError` naming the dotted key and what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from grc_jax.core.constants import MemoryMode
from grc_jax.core.errors import ConfigError


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': expected {expected}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig:
    """Llama-3 style RoPE frequency scaling (HF `rope_type: llama3`)."""

    rope_type: Literal["llama3"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def validate(self, key: str) -> None:
        _check(self.factor > 0, f"{key}.factor", "a positive number", self.factor)
        _check(
            self.high_freq_factor > self.low_freq_factor,
            f"{key}.high_freq_factor",
            f"a number above low_freq_factor={self.low_freq_factor}",
            self.high_freq_factor,
        )
        _check(
            self.original_max_position_embeddings > 0,
            f"{key}.original_max_position_embeddings",
            "a positive integer",
            self.original_max_position_embeddings,
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder hyper-parameters of the Llama / Qwen2 / Qwen3 family (names follow HF configs)."""

    family: Literal["llama", "qwen2", "qwen3"] = "llama"
    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    d_ff: int = 352
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig | None = None
    max_position_embeddings: int = 2048
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    init_std: float = 0.02
    # Parameters are always float32; `dtype` is the compute dtype of matmuls and activations.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    remat_policy: Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"] = (
        "none"
    )
    scan_layers: bool = False

    def validate(self, key: str) -> None:
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "d_ff",
        ):
            value = getattr(self, name)
            _check(value > 0, f"{key}.{name}", "a positive integer", value)
        _check(
            self.n_heads % self.n_kv_heads == 0,
            f"{key}.n_kv_heads",
            f"a divisor of n_heads={self.n_heads} (grouped-query attention)",
            self.n_kv_heads,
        )
        _check(
            self.head_dim % 2 == 0, f"{key}.head_dim", "an even number (RoPE pairs)", self.head_dim
        )
        _check(self.rms_norm_eps > 0, f"{key}.rms_norm_eps", "a positive number", self.rms_norm_eps)
        _check(self.rope_theta > 0, f"{key}.rope_theta", "a positive number", self.rope_theta)
        if self.rope_scaling is not None:
            self.rope_scaling.validate(f"{key}.rope_scaling")

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads


@dataclasses.dataclass(frozen=True)
class LossWeights:
    gen: float = 1.0
    rep: float = 1.0
    comp: float = 1.0

    def validate(self, key: str) -> None:
        for name in ("gen", "rep", "comp"):
            value = getattr(self, name)
            _check(value >= 0, f"{key}.{name}", "a non-negative number", value)


@dataclasses.dataclass(frozen=True)
class GRCConfig:
    """The GRC method's knobs (DESIGN.md): latents, visibility mode, pooling, contrastive loss."""

    num_latents: int = 16
    memory_mode: MemoryMode = "independent"
    pooling: Literal["mean", "last"] = "mean"
    projection_dim: int | None = None  # None: no projection head on the embedding
    loss_weights: LossWeights = LossWeights()
    temperature: float = 0.02
    learnable_temperature: bool = False
    # Latent table init: "normal" (N(0, init_std), from scratch) or "mean_embedding" (mean token
    # embedding + N(0, latent_init_noise) per entry: the default when GRC-tuning an imported model).
    latent_init: Literal["normal", "mean_embedding"] = "normal"
    latent_init_noise: float = 0.02

    def validate(self, key: str) -> None:
        _check(self.num_latents > 0, f"{key}.num_latents", "a positive integer", self.num_latents)
        if self.projection_dim is not None:
            _check(
                self.projection_dim > 0,
                f"{key}.projection_dim",
                "a positive integer or null",
                self.projection_dim,
            )
        _check(self.temperature > 0, f"{key}.temperature", "a positive number", self.temperature)
        _check(
            self.latent_init_noise >= 0,
            f"{key}.latent_init_noise",
            "a non-negative number",
            self.latent_init_noise,
        )
        self.loss_weights.validate(f"{key}.loss_weights")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape over axes ("data", "fsdp", "tensor"); one entry may be -1 (auto-fill)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def validate(self, key: str) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, value in sizes.items():
            _check(value == -1 or value > 0, f"{key}.{name}", "a positive integer or -1", value)
        autos = [n for n, v in sizes.items() if v == -1]
        _check(len(autos) <= 1, key, "at most one axis set to -1", sizes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train_path: str = "data/synth/train.jsonl"
    eval_path: str = "data/synth/validation.jsonl"
    tokenizer: str = ""  # sentencepiece .model or tokenizer.json; empty: the run's own
    seq_len: int = 256
    batch_size: int = 8  # global batch, in packed rows
    skip_bad_lines: bool = False
    shuffle_seed: int = 0
    # Fraction of training queries laid out without their reasoning/answer, so that embedding a
    # bare query (no self-reasoning) is also a trained case.
    reasoning_dropout: float = 0.25

    def validate(self, key: str) -> None:
        _check(self.seq_len > 0, f"{key}.seq_len", "a positive integer", self.seq_len)
        _check(self.batch_size > 0, f"{key}.batch_size", "a positive integer", self.batch_size)
        _check(
            0.0 <= self.reasoning_dropout <= 1.0,
            f"{key}.reasoning_dropout",
            "a number in [0, 1]",
            self.reasoning_dropout,
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_name: str = "tiny"
    output_dir: str = "runs"
    seed: int = 0
    steps: int = 300
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    microbatches: int = 1
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    export_every: int = 0  # write <run>/export/step_<n>/ (a HF directory) every n steps; 0: off
    eval_queries: int = 200  # held-out queries per evaluation (its corpus: their documents)
    # auto: resume from the newest checkpoint of the run if there is one; required: fail without
    # one; never: fail if the run already has checkpoints.
    resume: Literal["auto", "required", "never"] = "auto"
    # Resume from this checkpoint step instead of the newest (e.g. past a damaged one); newer
    # checkpoints are set aside. Applied once: a rerun whose config.yaml records it resumes from
    # the newest checkpoint. null: the newest.
    resume_step: int | None = None
    init_from: str = ""  # a `grc import-hf` output directory, to GRC-tune a pretrained model
    freeze_base: bool = False
    lora_rank: int = 0

    def validate(self, key: str) -> None:
        for name in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            _check(value > 0, f"{key}.{name}", "a positive integer", value)
        _check(
            self.learning_rate > 0, f"{key}.learning_rate", "a positive number", self.learning_rate
        )
        _check(
            self.warmup_steps >= 0,
            f"{key}.warmup_steps",
            "a non-negative integer",
            self.warmup_steps,
        )
        _check(
            self.microbatches > 0, f"{key}.microbatches", "a positive integer", self.microbatches
        )
        if self.resume_step is not None:
            _check(
                self.resume_step > 0, f"{key}.resume_step", "a positive integer or null",
                self.resume_step,
            )  # fmt: skip
        _check(self.lora_rank >= 0, f"{key}.lora_rank", "a non-negative integer", self.lora_rank)
        _check(
            self.export_every >= 0,
            f"{key}.export_every",
            "a non-negative integer (0: no periodic export)",
            self.export_every,
        )


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    grc: GRCConfig = GRCConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    def validate(self, key: str = "") -> None:
        for field in dataclasses.fields(self):
            getattr(self, field.name).validate(field.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain data, checking every key.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} keys"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        _check(value in choices, key, _type_name(tp), value)
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            _check(type(None) in args, key, _type_name(tp), value)
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error is the informative one
            return _convert(options[0], value, key)
        for arg in options:
            try:
                return _convert(arg, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        _check(isinstance(value, Mapping), key, _type_name(tp), value)
        return _build(tp, value, key)
    if tp is bool:
        _check(isinstance(value, bool), key, "a boolean (true/false)", value)
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string; accept it as the number it spells.
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(ok, key, "a number", value)
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, "a string", value)
        return value
    if origin in (tuple, list, Sequence):
        _check(isinstance(value, (list, tuple)), key, "a list", value)
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        return tuple(_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    return value


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(
                f"unknown config key '{key}'; valid keys here: {', '.join(sorted(names))}"
            )
        kwargs[k] = _convert(hints[k], v, key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], path: list[str], value: Any) -> None:
    node = base
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
        if not isinstance(child, dict):
            dotted = ".".join(path[: i + 1])
            raise ConfigError(
                f"config key '{dotted}' is not a section; cannot set '{'.'.join(path)}'"
            )
        node[part] = child
        node = child
    node[path[-1]] = value


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b=value`; the value is read as YAML (`3`, `1e-3`, `true`, `null`, `[1, 2]`)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: expected a dotted key before '='")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def config_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    """Build and validate a `Config` from nested plain data plus `a.b=value` overrides."""
    merged: dict[str, Any] = _to_plain(data)
    for text in overrides:
        path, value = parse_override(text)
        _merge(merged, path, value)
    cfg = _build(Config, merged, "")
    cfg.validate()
    return cfg


def _to_plain(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {str(k): _to_plain(v) for k, v in data.items()}
    return data


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config file and apply `a.b=value` overrides; fails naming any bad key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level")
    try:
        return config_from_dict(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_config(cfg: Config, path: str | Path) -> None:
    """Write `cfg` as YAML that `load_config` reads back to an equal `Config`."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
