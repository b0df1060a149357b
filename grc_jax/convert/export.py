"""`grc export`: a grc run, checkpoint or import -> a Hugging Face directory (see docs/export.md).

The directory is a standard transformers checkpoint of the base family, loadable without any grc
code (`AutoModelForCausalLM.from_pretrained(out)` gives the plain causal LM):

* `config.json`: `LlamaConfig` / `Qwen2Config` / `Qwen3Config` keys, with RoPE written both the
  transformers-5 way (`rope_parameters`) and the 4.x way (`rope_theta`, `rope_scaling`), plus
  `auto_map` naming the GRC class of `modeling_grc.py`;
* `model.safetensors` (or `model-0000i-of-0000n.safetensors` shards + `model.safetensors.index.json`
  above `max_shard_bytes`, 2 GB by default), in float32 or bfloat16;
* the tokenizer: a HF tokenizer's files as they are, or a sentencepiece `tokenizer.model` with a
  `tokenizer.json` that encodes exactly like it and prepends BOS (as grc does);
* `generation_config.json`;

and the GRC extras that `AutoModel.from_pretrained(out, trust_remote_code=True)` uses:

* `grc_config.json`: K, memory mode, pooling, projection size, temperature, RoPE, the special token
  ids grc used, the model fingerprint (memories are shared with the JAX engine) and the source;
* `grc/latents.safetensors`: the latent table `latents [K, d]` (and `projection [d, P]`). It lives
  in a subdirectory so that readers globbing `*.safetensors` (`grc import-hf`) see only the model;
* `modeling_grc.py`: a copy of `grc_jax/convert/hf_modeling_grc.py` (torch + transformers only).

Every check (family, flags, dtype, finite values, tokenizer, output directory) runs before anything
is written; the files are written into a temporary sibling directory and moved into place at the
end, so a failed export leaves the output directory as it was.

`export_hooks(cfg)` gives `grc train`'s loop the periodic export of `train.export_every` (training
itself never imports this module).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import grc_jax
from grc_jax.adapter import is_adapter_dir
from grc_jax.checkpoints import checkpoint_steps, load_model, model_kind
from grc_jax.convert.adapter import ensure_base
from grc_jax.convert.export_tokenizer import tokenizer_files
from grc_jax.convert.hf_config import hf_config_from_model
from grc_jax.convert.hf_import import TOKENIZER_FILES, load_hf_dir, read_safetensors
from grc_jax.convert.param_map import params_to_hf
from grc_jax.core.config import Config, ModelConfig
from grc_jax.core.errors import ExportError, MissingPathError, OutputExistsError
from grc_jax.infer.memory import model_fingerprint
from grc_jax.model.params import GRCParams
from grc_jax.train.hooks import Hook, Schedule, Tick

if TYPE_CHECKING:
    from grc_jax.train.loop import Run

EXPORT_FORMAT = "grc-export/1"
GRC_CONFIG = "grc_config.json"
GRC_TENSORS = "grc/latents.safetensors"
MODELING_FILE = "modeling_grc.py"
DEFAULT_MAX_SHARD_BYTES = 2_000_000_000  # "2GB", as transformers counts
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
GRC_CLASSES = {
    "llama": "GRCLlamaForCausalLM",
    "qwen2": "GRCQwen2ForCausalLM",
    "qwen3": "GRCQwen3ForCausalLM",
}
_FIXED_OUTPUTS = (
    "config.json",
    "generation_config.json",
    GRC_CONFIG,
    MODELING_FILE,
    "model.safetensors",
    "model.safetensors.index.json",
    "grc",
    *TOKENIZER_FILES,  # copied from a HF tokenizer's directory, when present
)


@dataclasses.dataclass(frozen=True)
class ExportResult:
    out: Path
    family: str
    dtype: str  # "float32" or "bfloat16"
    num_params: int  # in the HF model (latents excluded)
    files: tuple[str, ...]  # relative paths written
    step: int | None = None


# ----------------------------------------------------------------------------------- checks


def check_exportable(cfg: ModelConfig) -> None:
    """Raise `ExportError` if transformers' class of `cfg.family` cannot express this model."""
    classes = {
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
    }
    if cfg.family not in classes:
        raise ExportError(
            f"model.family={cfg.family!r} has no Hugging Face export; supported: "
            f"{', '.join(classes)}"
        )
    cls = classes[cfg.family]
    want_bias = cfg.family == "qwen2"  # transformers hard-codes q/k/v biases for Qwen2 only
    if cfg.qkv_bias != want_bias:
        raise ExportError(
            f"model.qkv_bias={cfg.qkv_bias} cannot be expressed by {cls}: "
            + (
                "Qwen2 always has q/k/v biases"
                if want_bias
                else "its attention_bias would also add an o_proj bias, which grc's model lacks"
            )
        )
    want_norm = cfg.family == "qwen3"
    if cfg.qk_norm != want_norm:
        raise ExportError(
            f"model.qk_norm={cfg.qk_norm} cannot be expressed by {cls}: "
            + ("Qwen3 always normalises q and k" if want_norm else "it has no q/k norms")
        )
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type != "llama3":
        raise ExportError(
            f"model.rope_scaling.rope_type={cfg.rope_scaling.rope_type!r}: unsupported"
        )


def export_dtype(dtype: str) -> str:
    """`fp32`/`float32` -> `float32`, `bf16`/`bfloat16` -> `bfloat16`; anything else is refused."""
    if dtype not in DTYPES:
        raise ExportError(
            f"export dtype {dtype!r} is not supported; choose one of fp32, bf16 (float32, bfloat16)"
        )
    return DTYPES[dtype]


def check_output(out: str | Path, force: bool) -> None:
    """Refuse a non-directory `out`, or a non-empty one without `force`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(
            f"output directory {str(out)!r} is not empty; use --force (force=True) to replace "
            "an export there"
        )


def _to_numpy(tree: Any) -> Any:
    import jax

    return jax.tree.map(np.asarray, jax.device_get(tree))


def _cast(name: str, value: np.ndarray, dtype: str) -> np.ndarray:
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
        raise ExportError(
            f"param {name!r} has dtype {value.dtype}; an HF export holds float tensors only"
        )
    value = np.asarray(value, np.float32)
    if not np.isfinite(value).all():
        raise ExportError(f"param {name!r} holds NaN or infinite values; refusing to export it")
    if dtype == "bfloat16":
        import ml_dtypes

        value = value.astype(ml_dtypes.bfloat16)
        if not np.isfinite(value.astype(np.float32)).all():
            raise ExportError(f"param {name!r} overflows bfloat16")
    return np.ascontiguousarray(value)


# ----------------------------------------------------------------------------------- configs


def hf_config_dict(cfg: Config, dtype: str, special: Mapping[str, int]) -> dict[str, Any]:
    """`config.json`: the family's HF config (5.x and 4.x RoPE keys), ids, dtype and `auto_map`."""
    out = hf_config_from_model(cfg.model)
    m = cfg.model
    out["rope_theta"] = m.rope_theta  # transformers 4.x
    out["rope_scaling"] = (  # with its rope_type: llama3
        None
        if m.rope_scaling is None
        else {k: v for k, v in out["rope_parameters"].items() if k != "rope_theta"}
    )
    if m.family == "qwen2":
        out["use_sliding_window"] = False
    out.update(
        bos_token_id=special["bos_token_id"],
        eos_token_id=special["eos_token_id"],
        pad_token_id=special["pad_token_id"],
        use_cache=True,
        dtype=dtype,
        torch_dtype=dtype,  # the 4.x name
        auto_map={
            "AutoModel": f"modeling_grc.{GRC_CLASSES[m.family]}",
            "AutoModelForCausalLM": f"modeling_grc.{GRC_CLASSES[m.family]}",
        },
    )
    return out


def grc_config_dict(
    cfg: Config, params: GRCParams, dtype: str, special: Mapping[str, int],
    fingerprint: str, source: Mapping[str, Any],
) -> dict[str, Any]:  # fmt: skip
    head = params.head
    temperature = float(np.exp(np.asarray(head.log_temperature, np.float64)))
    m = cfg.model
    return {
        "format": EXPORT_FORMAT,
        "family": m.family,
        "num_latents": cfg.grc.num_latents,
        "memory_mode": cfg.grc.memory_mode,
        "pooling": cfg.grc.pooling,
        "projection_dim": head.dim,
        "embedding_dim": head.dim or m.d_model,
        "temperature": temperature,
        "learnable_temperature": cfg.grc.learnable_temperature,
        "rope": {
            "theta": m.rope_theta,
            "scaling": None if m.rope_scaling is None else dataclasses.asdict(m.rope_scaling),
        },
        **special,
        "model_fingerprint": fingerprint,
        "dtype": dtype,
        "source": dict(source),
        "grc_jax_version": grc_jax.__version__,
    }


# ----------------------------------------------------------------------------------- tokenizer


def _shards(tensors: Mapping[str, np.ndarray], max_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, value in tensors.items():
        if groups[-1] and size + value.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += value.nbytes
    return groups


def _write_model(tensors: Mapping[str, np.ndarray], directory: Path, max_bytes: int) -> list[str]:
    from safetensors.numpy import save_file

    groups = _shards(tensors, max_bytes)
    if len(groups) == 1:
        save_file(dict(tensors), str(directory / "model.safetensors"), {"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k] for k in group}, str(directory / name), {"format": "pt"})
        weight_map.update({k: name for k in group})
        names.append(name)
    index = {
        "metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
        "weight_map": weight_map,
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [*names, "model.safetensors.index.json"]


def _clear_previous_export(out: Path) -> None:
    """Remove what an export writes (nothing else) from `out`, for `force`."""
    for name in _FIXED_OUTPUTS:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    for shard in out.glob("model-*-of-*.safetensors"):
        shard.unlink()


def _install(tmp: Path, out: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in tmp.rglob("*"):  # safetensors writes 0600 files; give every file the usual mode
        if path.is_file():
            path.chmod(0o666 & ~umask)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
        return
    _clear_previous_export(out)
    for entry in tmp.iterdir():
        entry.rename(out / entry.name)
    tmp.rmdir()


# ----------------------------------------------------------------------------------- export


def export_params(
    cfg: Config,
    params: GRCParams,
    tok: Any,
    out: str | Path,
    dtype: str = "fp32",
    *,
    force: bool = False,
    source: Mapping[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    step: int | None = None,
) -> ExportResult:
    """Export grc train params (`{"model", "head"[, "lora"]}`) and their tokenizer to `out`.

    LoRA factors are merged; the scanned layout is unstacked. Raises `ExportError` (a
    `ValueError`) for what HF cannot express and `OutputExistsError` (a `FileExistsError`) for a
    non-empty `out` without `force`, before anything is written.
    """

    out = Path(out)
    hf_dtype = export_dtype(dtype)
    check_exportable(cfg.model)
    check_output(out, force)
    if max_shard_bytes <= 0:
        raise ExportError(f"max_shard_bytes: expected a positive size, got {max_shard_bytes}")
    if not isinstance(params, GRCParams):
        raise ExportError(f"expected GRCParams (model, head, lora), got {type(params).__name__}")
    params = _to_numpy(params)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ExportError(
            f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}"
        )
    model_params = _to_numpy(params.merged(cfg.model.scan_layers))
    hf = params_to_hf(model_params, cfg.model)
    tensors = {name: _cast(name, value, hf_dtype) for name, value in hf.items()}
    grc_tensors = {"latents": _cast("latents", np.asarray(model_params["latents"]), hf_dtype)}
    if params.head.projection is not None:
        grc_tensors["projection"] = _cast("head/projection", params.head.projection, "float32")
    special = {
        "bos_token_id": int(tok.bos_id),
        "eos_token_id": int(tok.eos_id),
        "pad_token_id": int(tok.pad_id),
    }
    tok_files = tokenizer_files(tok, cfg.model.max_position_embeddings)
    source = dict(source or {})
    if step is not None:
        source.setdefault("step", step)
    configs = {
        "config.json": hf_config_dict(cfg, hf_dtype, special),
        GRC_CONFIG: grc_config_dict(
            cfg, params, hf_dtype, special, model_fingerprint(cfg, params), source
        ),
        "generation_config.json": _generation_config(tok, special),
    }

    tmp = out.parent / f".{out.name}.export-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        written = _write_model(tensors, tmp, max_shard_bytes)
        from safetensors.numpy import save_file

        (tmp / "grc").mkdir()
        save_file(grc_tensors, str(tmp / GRC_TENSORS), {"format": "pt"})
        for name, content in tok_files.items():
            (tmp / name).write_bytes(content)
        for name, content in configs.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        shutil.copyfile(Path(__file__).with_name("hf_modeling_grc.py"), tmp / MODELING_FILE)
        written += [GRC_TENSORS, *tok_files, *configs, MODELING_FILE]
        _install(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return ExportResult(
        out=out,
        family=cfg.model.family,
        dtype=hf_dtype,
        num_params=int(sum(v.size for v in tensors.values())),
        files=tuple(written),
        step=source.get("step"),
    )


def _generation_config(tok: Any, special: Mapping[str, int]) -> dict:
    """The special token ids, over the source's `generation_config.json` if its tokenizer
    directory has one (a HF import keeps the base model's)."""
    config: dict[str, Any] = {}
    source = Path(getattr(tok, "path", "")).parent / "generation_config.json"
    if getattr(tok, "path", None) is not None and source.is_file():
        config = json.loads(source.read_text())
    for key, value in special.items():
        config.setdefault(key, value)
    return config


def resolve_checkpoint(path: str | Path, step: int | None = None) -> tuple[Path, int | None]:
    """(model directory for `load_model`, step) of a run dir, a run's `checkpoints/<step>` dir,
    its `checkpoints/` dir, or an import dir."""
    path = Path(path)
    if not path.exists():
        raise MissingPathError(f"checkpoint path {str(path)!r} does not exist")
    if path.name.isdigit() and path.parent.name == "checkpoints":
        run = path.parent.parent
        if (run / "config.yaml").is_file():
            if step is not None and step != int(path.name):
                raise ExportError(
                    f"--step {step} contradicts the checkpoint directory {str(path)!r}"
                )
            return run, int(path.name)
    if path.name == "checkpoints" and (path.parent / "config.yaml").is_file():
        return path.parent, step
    return path, step


def export_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    dtype: str = "fp32",
    *,
    step: int | None = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ExportResult:
    """Export a run (newest checkpoint, or `step`), a `checkpoints/<step>` dir, an import dir or
    an adapter (over its base)."""
    export_dtype(dtype)
    check_output(out, force)  # fail before the (slow) load
    model_dir, step = resolve_checkpoint(ckpt, step)
    if is_adapter_dir(model_dir):
        ensure_base(model_dir)
    cfg, params, tok = load_model(model_dir, step)
    kind = model_kind(model_dir)
    if kind == "run" and step is None:
        step = checkpoint_steps(model_dir)[-1]
    source = {"path": str(model_dir.absolute()), "kind": kind, "step": step}
    return export_params(
        cfg, params, tok, out, dtype, force=force, source=source, max_shard_bytes=max_shard_bytes
    )


def export_during_training(
    cfg: Config, params: Any, tok: Any, run_directory: str | Path, step: int
) -> Path | None:
    """The periodic export of `train.export_every`: `<run>/export/step_<step>/`, in float32.

    Every process must call it (the params are gathered across processes); process 0 writes.
    Returns the directory on process 0, None elsewhere.
    """
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    else:
        params = jax.device_get(params)
    if jax.process_index() != 0:
        return None
    out = Path(run_directory) / "export" / f"step_{step}"
    source = {"path": str(Path(run_directory).absolute()), "kind": "run", "step": step}
    export_params(cfg, params, tok, out, "fp32", force=True, source=source)
    return out


class PeriodicExport(Hook):
    """A training hook: `export_during_training` of the run's params at its steps."""

    def __call__(self, run: Run, tick: Tick) -> None:
        export_during_training(run.cfg, run.state.params, run.tok, run.directory, tick.step)


def export_hooks(cfg: Config) -> list[Hook]:
    """The periodic export of `train.export_every` as `train(cfg, hooks=...)` hooks; none when it
    is 0. Refuses a model HF cannot express (`ExportError`) now, not after N steps."""
    if not cfg.train.export_every:
        return []
    check_exportable(cfg.model)
    return [PeriodicExport(Schedule(every=cfg.train.export_every))]


def load_export(out: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """(config.json, HF-named float32 tensors, GRC tensors + grc_config) of an export."""
    out = Path(out)
    hf, tensors, _ = load_hf_dir(out)
    grc = json.loads((out / GRC_CONFIG).read_text())
    extras = {k: np.asarray(v, np.float32) for k, v in read_safetensors(out / GRC_TENSORS).items()}
    tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    return hf, tensors, {"grc_config": grc, **extras}
