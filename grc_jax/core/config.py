"""Typed configuration: dataclasses loaded from YAML with `a.b=value` overrides.

Every key is checked at load time: an unknown key, a value of the wrong type or a value out of range
raises `ConfigError` naming the dotted key and what was expected. Each numeric field declares its
range where it is defined (`_num(default, ge=/gt=/le=/lt=)`; non-finite floats never pass), each
section its rules between fields (`_relations`); `grc_jax.core.sharding.check_batch_sharding`
adds the rules that need the device count.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from grc_jax.core.constants import MemoryMode
from grc_jax.core.errors import ConfigError


def _show(value: Any) -> str:
    """A value as a message shows it: `-5` for the float -5.0, `inf`, `'text'`."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': expected {expected}, got {_show(value)}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ---------------------------------------------------------------------------------------------
# Value rules, declared next to each field (`_num`, `_dir_name`) and applied by `_Section.validate`.
# Every int / float field must carry a `Range`; relations between fields (n_heads divisible by
# n_kv_heads, ...) live in each section's `_relations`.

_RULE = "grc_rule"  # the dataclass field metadata key holding a field's rule


@dataclasses.dataclass(frozen=True)
class Range:
    """The allowed values of a numeric key: finite, between `lo` and `hi` (None: unbounded; open
    bounds exclude the bound), or one of `also` (values with a special meaning, e.g. -1: auto)."""

    lo: int | float | None = None
    hi: int | float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple[Any, ...] = ()
    note: str = ""  # what the special values mean, shown in the message

    def allows(self, value: Any) -> bool:
        if value in self.also:
            return True
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def describe(self, kind: str) -> str:
        """E.g. `a number in [0, 1]`, `a positive integer (>= 1)`, `a positive integer or -1
        (>= 1; -1: the remaining devices)`; `kind` is "integer", "number" or "finite number"."""
        lo, hi = self.lo, self.hi
        bound = ""
        if hi is not None:
            left = "(" if self.lo_open else "["
            right = ")" if self.hi_open else "]"
            low = "-inf" if lo is None else _show(lo)
            words = f"{kind} in {left}{low}, {_show(hi)}{right}"
        elif lo is None:
            words = kind
        else:
            bound = f"{'>' if self.lo_open else '>='} {_show(lo)}"
            if lo == 0 and self.lo_open or lo == 1 and not self.lo_open and kind == "integer":
                words = f"positive {kind}"
            elif lo == 0:
                words = f"non-negative {kind}"
            else:
                words, bound = f"{kind} {bound}", ""
        words = ("an " if words[0] in "aeiou" else "a ") + words
        words += "".join(f" or {'null' if a is None else _show(a)}" for a in self.also)
        details = "; ".join(d for d in (bound, self.note) if d)
        return f"{words} ({details})" if details else words

    def check(self, value: Any, key: str, kind: str) -> None:
        if not self.allows(value):
            finite = isinstance(value, float) and kind == "number" and not math.isfinite(value)
            _check(False, key, self.describe("finite number" if finite else kind), value)


@dataclasses.dataclass(frozen=True)
class DirName:
    """A single directory name joined under another directory: never empty, `.`, `..`, a path
    separator or an absolute path, so that the joined path stays inside that directory."""

    parent: str  # the key of the directory it goes under, for the message

    def check(self, value: Any, key: str, kind: str) -> None:
        bad = (
            not value.strip()
            or value in (".", "..")
            or any(c in value for c in "/\\\0")
            or Path(value).is_absolute()
        )
        expected = (
            f"one directory name inside {self.parent} (not empty, '.' or '..', no '/' or '\\')"
        )
        _check(not bad, key, expected, value)


def _num(
    default: Any,
    *,
    ge: int | float | None = None,
    gt: int | float | None = None,
    le: int | float | None = None,
    lt: int | float | None = None,
    also: tuple[Any, ...] = (),
    note: str = "",
) -> Any:
    """A numeric dataclass field with its allowed range: `ge`/`gt` (>=, >) and `le`/`lt`."""
    rule = Range(
        lo=gt if gt is not None else ge,
        hi=lt if lt is not None else le,
        lo_open=gt is not None,
        hi_open=lt is not None,
        also=also,
        note=note,
    )
    return dataclasses.field(default=default, metadata={_RULE: rule})


def _dir_name(default: str, parent: str) -> Any:
    """A string field used as one directory name under the directory of key `parent`."""
    return dataclasses.field(default=default, metadata={_RULE: DirName(parent)})


def _numeric_kind(tp: Any) -> str | None:
    """`integer` / `number` for int / float fields (also `X | None`), else None."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()
    options = [a for a in args if a is not type(None)] if args else [tp]
    if options == [int]:
        return "integer"
    if options == [float]:
        return "number"
    return None


class _Section:
    """Base of the config sections: `validate` applies the fields' declared rules (recursing into
    nested sections), then the section's `_relations` between fields."""

    def validate(self, key: str) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            name, value = _join(key, field.name), getattr(self, field.name)
            if isinstance(value, _Section):
                value.validate(name)
                continue
            rule = field.metadata.get(_RULE)
            kind = _numeric_kind(hints[field.name])
            if kind is not None and not isinstance(rule, Range):
                raise TypeError(f"{type(self).__name__}.{field.name}: a number without a Range")
            if rule is not None:
                rule.check(value, name, kind or "string")
        self._relations(key)

    def _relations(self, key: str) -> None:
        """Rules between fields of this section (none by default)."""


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig(_Section):
    """Llama-3 style RoPE frequency scaling (HF `rope_type: llama3`)."""

    rope_type: Literal["llama3"] = "llama3"
    factor: float = _num(8.0, gt=0)
    low_freq_factor: float = _num(1.0, gt=0)
    high_freq_factor: float = _num(4.0, gt=0)
    original_max_position_embeddings: int = _num(8192, ge=1)

    def _relations(self, key: str) -> None:
        _check(
            self.high_freq_factor > self.low_freq_factor,
            f"{key}.high_freq_factor",
            f"a number above low_freq_factor={_show(self.low_freq_factor)}",
            self.high_freq_factor,
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    """Decoder hyper-parameters of the Llama / Qwen2 / Qwen3 family (names follow HF configs)."""

    family: Literal["llama", "qwen2", "qwen3"] = "llama"
    vocab_size: int = _num(512, ge=1)
    d_model: int = _num(128, ge=1)
    n_layers: int = _num(4, ge=1)
    n_heads: int = _num(4, ge=1)
    n_kv_heads: int = _num(2, ge=1)  # a divisor of n_heads (`_relations`)
    head_dim: int = _num(32, ge=1)  # even (`_relations`)
    d_ff: int = _num(352, ge=1)
    rms_norm_eps: float = _num(1e-5, gt=0)
    rope_theta: float = _num(10000.0, gt=0)
    rope_scaling: RopeScalingConfig | None = None
    max_position_embeddings: int = _num(2048, ge=1)
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    init_std: float = _num(0.02, gt=0)
    # Parameters are always float32; `dtype` is the compute dtype of matmuls and activations.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    remat_policy: Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"] = (
        "none"
    )
    scan_layers: bool = False
    # How attention lays out its einsums (`grc_jax.model.layers.dot_product_attention`): the same
    # math; head_major is about twice as fast on CPU, token_major is what earlier runs computed.
    attention_layout: Literal["token_major", "head_major"] = "token_major"
    # The training pass's attention (docs/architecture.md, "Attention implementations"): `dense`
    # builds the [t, t] mask (the reference); `chunked` is GRC flash attention in pure JAX, memory
    # O(t x attention_chunk); `kernel` is its Pallas TPU kernel (the chunked one elsewhere).
    attention_impl: Literal["dense", "chunked", "kernel"] = "dense"
    attention_chunk: int = _num(512, ge=8)

    def _relations(self, key: str) -> None:
        _check(
            self.n_heads % self.n_kv_heads == 0,
            f"{key}.n_kv_heads",
            f"a divisor of n_heads={self.n_heads} (grouped-query attention)",
            self.n_kv_heads,
        )
        _check(
            self.head_dim % 2 == 0, f"{key}.head_dim", "an even number (RoPE pairs)", self.head_dim
        )

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads


@dataclasses.dataclass(frozen=True)
class LossWeights(_Section):
    gen: float = _num(1.0, ge=0)
    rep: float = _num(1.0, ge=0)
    comp: float = _num(1.0, ge=0)

    def _relations(self, key: str) -> None:
        weights = {"gen": self.gen, "rep": self.rep, "comp": self.comp}
        _check(any(w > 0 for w in weights.values()), key, "at least one weight above 0", weights)


@dataclasses.dataclass(frozen=True)
class GRCConfig(_Section):
    """The GRC method's knobs (DESIGN.md): latents, visibility mode, pooling, contrastive loss."""

    num_latents: int = _num(16, ge=1)
    memory_mode: MemoryMode = "independent"
    pooling: Literal["mean", "last"] = "mean"
    # None: no projection head on the embedding
    projection_dim: int | None = _num(None, ge=1, also=(None,))
    loss_weights: LossWeights = LossWeights()
    temperature: float = _num(0.02, gt=0)
    learnable_temperature: bool = False
    # Latent table init: "normal" (N(0, init_std), from scratch) or "mean_embedding" (mean token
    # embedding + N(0, latent_init_noise) per entry: the default when GRC-tuning an imported model).
    latent_init: Literal["normal", "mean_embedding"] = "normal"
    latent_init_noise: float = _num(0.02, ge=0)


# ModelConfig fields that choose how the model executes, not what it computes: a model is the same
# model under any of their values (scan_layers stores the layers' params stacked, the same values).
EXECUTION_FIELDS = (
    "dtype", "remat_policy", "scan_layers", "attention_layout", "attention_impl",
    "attention_chunk",
)  # fmt: skip


def model_differences(
    a: ModelConfig, b: ModelConfig, labels: tuple[str, str], skip=EXECUTION_FIELDS
) -> list[str]:
    """The `model.*` keys on which `b` differs from `a`, as `model.key: a (label) -> b (label)`;
    fields in `skip` (by default the execution options) are ignored, and floats compare at float32
    precision (a GGUF stores `rms_norm_eps` as float32: 1e-5 in a config is the same model)."""
    diffs = []
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if field.name in skip:
            continue
        if not (_float32(x) == _float32(y) if isinstance(x, float) else x == y):
            diffs.append(f"model.{field.name}: {x!r} ({labels[0]}) -> {y!r} ({labels[1]})")
    return diffs


def _float32(x: float) -> float | bytes:
    """`x` rounded to float32 (as bytes), or `x` itself beyond float32's range."""
    try:
        return struct.pack("f", x)
    except OverflowError:
        return x


_AUTO_AXIS = dict(also=(-1,), note="-1: the remaining devices")


@dataclasses.dataclass(frozen=True)
class MeshConfig(_Section):
    """Device mesh shape over axes ("data", "fsdp", "tensor"); one entry may be -1 (auto-fill)."""

    data: int = _num(-1, ge=1, **_AUTO_AXIS)
    fsdp: int = _num(1, ge=1, **_AUTO_AXIS)
    tensor: int = _num(1, ge=1, **_AUTO_AXIS)

    def _relations(self, key: str) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        autos = [n for n, v in sizes.items() if v == -1]
        _check(len(autos) <= 1, key, "at most one axis set to -1", sizes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


_SEED = dict(ge=0, le=2**32 - 1)


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    train_path: str = "data/synth/train.jsonl"
    eval_path: str = "data/synth/validation.jsonl"
    tokenizer: str = ""  # sentencepiece .model or tokenizer.json; empty: the run's own
    seq_len: int = _num(256, ge=1)
    # Global batch, in packed rows; a multiple of the data-parallel size (mesh data x fsdp) and
    # of train.microbatches (`grc_jax.core.sharding.check_batch_sharding`).
    batch_size: int = _num(8, ge=1)
    skip_bad_lines: bool = False
    shuffle_seed: int = _num(0, **_SEED)
    # Fraction of training queries laid out without their reasoning/answer, so that embedding a
    # bare query (no self-reasoning) is also a trained case.
    reasoning_dropout: float = _num(0.25, ge=0, le=1)
    # Extra layouts (DESIGN.md 4) added to a chosen fraction of the records' groups, so that the
    # inference modes reading several memories or a running memory are trained. RAG example
    # (grc.memory_mode=independent): rag_memories compressed documents, the positive among hard
    # negatives, then the query generating the first rag_target_tokens tokens of the positive
    # (or its compress_target). Recurrent chain (grc.memory_mode=recurrent): the positive cut
    # into chunks of chunk_tokens tokens (at most max_chunks; a one-chunk document makes none),
    # each compressed reading the previous memory, then the last chunk regenerated.
    rag_fraction: float = _num(0.0, ge=0, le=1, note="0: no RAG examples")
    rag_memories: int = _num(3, ge=2)
    rag_target_tokens: int = _num(64, ge=1)
    recurrent_fraction: float = _num(0.0, ge=0, le=1, note="0: no recurrent chains")
    chunk_tokens: int = _num(32, ge=1)
    max_chunks: int = _num(4, ge=2)


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Section):
    # The run directory is <output_dir>/<run_name>: run_name is one plain directory name.
    run_name: str = _dir_name("tiny", parent="train.output_dir")
    output_dir: str = "runs"
    seed: int = _num(0, **_SEED)
    steps: int = _num(300, ge=1)
    learning_rate: float = _num(3e-3, gt=0)
    warmup_steps: int = _num(20, ge=0)
    min_lr_ratio: float = _num(0.1, ge=0, le=1)  # final learning rate / peak learning rate
    weight_decay: float = _num(0.01, ge=0)
    grad_clip: float = _num(1.0, gt=0)  # global gradient-norm clip
    microbatches: int = _num(1, ge=1)  # a divisor of data.batch_size (`Config._relations`)
    log_every: int = _num(10, ge=1)
    eval_every: int = _num(100, ge=1)
    checkpoint_every: int = _num(100, ge=1)
    keep_checkpoints: int = _num(3, ge=1)
    # write <run>/export/step_<n>/ (a HF directory) every n steps; 0: off
    export_every: int = _num(0, ge=0, note="0: no periodic export")
    # held-out queries per evaluation (its corpus: their documents)
    eval_queries: int = _num(200, ge=1)
    # auto: resume from the newest checkpoint of the run if there is one; required: fail without
    # one; never: fail if the run already has checkpoints.
    resume: Literal["auto", "required", "never"] = "auto"
    # Resume from this checkpoint step instead of the newest (e.g. past a damaged one); newer
    # checkpoints are set aside. Applied once: a rerun whose config.yaml records it resumes from
    # the newest checkpoint. null: the newest.
    resume_step: int | None = _num(None, ge=1, also=(None,), note="null: the newest checkpoint")
    init_from: str = ""  # a `grc import-hf` output directory, to GRC-tune a pretrained model
    freeze_base: bool = False
    lora_rank: int = _num(0, ge=0, note="0: no LoRA")
    # Where the token losses compute logits: at every position, or only where a GEN target is
    # predicted (`grc_jax.train.losses.target_token_losses`): the same loss, about half the LM
    # head's work, float rounding differs from `all` (what earlier runs computed).
    logits_at: Literal["all", "targets"] = "all"


@dataclasses.dataclass(frozen=True)
class Config(_Section):
    model: ModelConfig = ModelConfig()
    grc: GRCConfig = GRCConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    def validate(self, key: str = "") -> None:
        super().validate(key)

    def _relations(self, key: str) -> None:
        _check(
            self.data.batch_size % self.train.microbatches == 0,
            _join(key, "train.microbatches"),
            f"a divisor of data.batch_size={self.data.batch_size} (GradCache microbatches)",
            self.train.microbatches,
        )
        mode = self.grc.memory_mode
        # A recurrent consumer reads only the last memory; an independent block no earlier one.
        _check(
            self.data.rag_fraction == 0 or mode == "independent",
            _join(key, "data.rag_fraction"),
            f"0 with grc.memory_mode={mode} (a RAG example reads several memories: independent)",
            self.data.rag_fraction,
        )
        _check(
            self.data.recurrent_fraction == 0 or mode == "recurrent",
            _join(key, "data.recurrent_fraction"),
            f"0 with grc.memory_mode={mode} (a chain reads the previous memory: recurrent)",
            self.data.recurrent_fraction,
        )

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
