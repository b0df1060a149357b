"""`import_checkpoint`: a HF directory (config.json + safetensors) or a GGUF file -> a grc import.

The output directory holds:

* `config.yaml`: a full grc `Config` (model section from the checkpoint, grc defaults with
  `latent_init: mean_embedding`), readable with `grc_jax.core.config.load_config`;
* `params/`: an Orbax checkpoint of the float32 params pytree;
* the tokenizer: copied from a HF directory, or `tokenizer.json` + `tokenizer_config.json` built
  from a GGUF vocabulary;
* `import_info.json`: source path and format, family, source files with size and sha256, the
  HF-style config read, the grc-jax version.

`load_imported(out)` reads it back as `(Config, params)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np

import grc_jax
from grc_jax.checkpoints import save_params
from grc_jax.convert.gguf import load_gguf, save_tokenizer
from grc_jax.convert.hf_config import model_config_from_hf
from grc_jax.convert.param_map import hf_to_params
from grc_jax.core.config import Config, config_from_dict, save_config
from grc_jax.core.errors import ImportModelError, MissingPathError, OutputExistsError

# A HF tokenizer's files (copied on import and on export when present).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_COPIED = (*TOKENIZER_FILES, "generation_config.json")
_OUTPUTS = ("config.yaml", "params", "import_info.json", *_COPIED)

# safetensors dtype -> numpy dtype (bfloat16 and float8 through ml_dtypes, which JAX ships).
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes

    value = _SAFETENSORS_DTYPES[name]
    return np.dtype(getattr(ml_dtypes, value, value))


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Memory-mapped numpy arrays of a .safetensors file (any float dtype, bfloat16 included)."""
    path = Path(path)
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        n = int(np.frombuffer(raw[:8].tobytes(), dtype="<u8")[0])
        header = json.loads(raw[8 : 8 + n].tobytes())
        base = 8 + n
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _np_dtype(info["dtype"])
            start, end = info["data_offsets"]
            out[name] = raw[base + start : base + end].view(dtype).reshape(info["shape"])
        return out
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ImportModelError(f"cannot read safetensors file {str(path)!r}: {e!r}") from e


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MissingPathError(f"{str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ImportModelError(f"cannot read {str(path)!r}: {e}") from e


def _shard_path(src: Path, entry: Any, index: Path) -> Path:
    """A `weight_map` file entry as a path inside the model directory `src`; an entry that could
    name a file elsewhere (absolute, a `..` component, a subdirectory that resolves outside
    `src`) is refused.

    The file itself may be a symlink: the Hugging Face cache links each snapshot's files to its
    `blobs/`; what the index names must lie in the directory, and the directories it passes through
    must resolve inside it.
    """
    if not isinstance(entry, str) or not entry.strip():
        raise ImportModelError(f"{str(index)!r}: weight_map entry {entry!r} is not a file name")
    name = PurePath(entry)
    outside = (
        f"{str(index)!r}: weight_map entry {entry!r} {{}}; weight files are read only from "
        f"inside the model directory {str(src)!r}"
    )
    if name.is_absolute() or name.drive or name.root:
        raise ImportModelError(outside.format("is an absolute path"))
    if ".." in name.parts:
        raise ImportModelError(outside.format("points outside the model directory"))
    path = src / name
    if not path.parent.resolve().is_relative_to(src.resolve()):
        raise ImportModelError(outside.format("is in a directory that resolves elsewhere"))
    return path


def safetensors_files(src: Path) -> list[Path]:
    """A HF directory's weight files: per `model.safetensors.index.json`, else `*.safetensors`."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        meta = _read_json(index)
        weight_map = meta.get("weight_map") if isinstance(meta, Mapping) else None
        if not isinstance(weight_map, Mapping) or not weight_map:
            raise ImportModelError(f"{str(index)!r} has no 'weight_map'")
        files = sorted({_shard_path(src, f, index) for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise MissingPathError(f"{str(f)!r} (listed in {str(index)!r}) does not exist")
        return files
    files = sorted(src.glob("*.safetensors"))
    if not files:
        hint = (
            " (pytorch_model.bin is not supported; re-save with safetensors)"
            if any(src.glob("pytorch_model*.bin"))
            else ""
        )
        raise MissingPathError(f"no *.safetensors files in {str(src)!r}{hint}")
    return files


def load_hf_dir(src: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray], list[Path]]:
    """(config.json dict, HF-named tensors, weight files) of a HF model directory."""
    src = Path(src)
    if not src.is_dir():
        raise MissingPathError(f"HF model directory {str(src)!r} does not exist")
    hf = _read_json(src / "config.json")
    files = safetensors_files(src)
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        for name, arr in read_safetensors(f).items():
            if name in tensors:
                raise ImportModelError(
                    f"tensor {name!r} appears in more than one file (again in {str(f)!r})"
                )
            tensors[name] = arr
    return hf, tensors, files


def _file_info(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return {"name": path.name, "size": path.stat().st_size, "sha256": digest.hexdigest()}


def _check_out(out: Path, force: bool) -> bool:
    """Whether `out` holds files; raises if it may not be written."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {str(out)!r} exists and is not a directory")
    busy = out.is_dir() and any(out.iterdir())
    if busy and not force:
        raise OutputExistsError(
            f"output directory {str(out)!r} is not empty (use force=True / --force)"
        )
    return busy


def _prepare_out(out: Path, force: bool) -> None:
    if _check_out(out, force):
        for name in _OUTPUTS:  # remove only what an import writes
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def import_checkpoint(
    src: str | Path,
    out: str | Path,
    grc_overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
    *,
    model_overrides: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    force: bool = False,
) -> Config:
    """Import `src` (HF directory or `.gguf` file) into `out`; returns the written `Config`.

    `grc_overrides` sets GRCConfig fields (e.g. `{"num_latents": 8}`), `model_overrides` ModelConfig
    fields the checkpoint does not fix (`scan_layers`, `dtype`, `remat_policy`), `overrides` any
    `a.b=value` config override. Refuses a non-empty `out` unless `force`.
    """
    src, out = Path(src), Path(out)
    _check_out(out, force)  # fail before the (slow) load
    if src.is_file() and src.suffix == ".gguf":
        fmt = "gguf"
        hf, tensors, meta = load_gguf(src)
        files = [src]
    elif src.is_dir():
        fmt, meta = "safetensors", None
        hf, tensors, files = load_hf_dir(src)
    else:
        raise MissingPathError(
            f"import source {str(src)!r} is neither a HF model directory nor a .gguf file"
        )
    model = model_config_from_hf(hf)
    data: dict[str, Any] = {
        "model": {**dataclasses.asdict(model), **dict(model_overrides or {})},
        "grc": {"latent_init": "mean_embedding", **dict(grc_overrides or {})},
        # A run trained from this config must not write into the import directory itself.
        "train": {"run_name": f"{out.absolute().name}-grc", "init_from": str(out)},
    }
    if fmt == "gguf":
        tokenizers = ["tokenizer.json"]
    else:
        tokenizers = [f for f in ("tokenizer.json", "tokenizer.model") if (src / f).is_file()]
    if tokenizers:
        data["data"] = {"tokenizer": str(out / tokenizers[0])}
    cfg = config_from_dict(data, overrides)
    params = hf_to_params(tensors, cfg.model, cfg.grc, seed=seed)

    _prepare_out(out, force)
    save_config(cfg, out / "config.yaml")
    save_params(params, out / "params")
    if fmt == "gguf":
        copied = save_tokenizer(meta, out)
    else:
        copied = [f for f in _COPIED if (src / f).is_file()]
        for f in copied:
            shutil.copyfile(src / f, out / f)
    info = {
        "source": str(src.absolute()),
        "format": fmt,
        "family": cfg.model.family,
        "files": [_file_info(f) for f in files],
        "tokenizer_files": copied,
        "num_params": int(sum(np.size(t) for t in _leaves(params))),
        "seed": seed,
        "hf_config": hf,
        "grc_jax_version": grc_jax.__version__,
    }
    (out / "import_info.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return cfg


def _leaves(tree: Any) -> list[Any]:
    import jax

    return jax.tree.leaves(tree)
