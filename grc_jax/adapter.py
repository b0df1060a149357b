"""GRC adapters: what a frozen-base GRC tune trains, without the base weights.

A run with `train.freeze_base=true` changes only the latent table, the embedding head and the
LoRA factors (`model.params.is_adapter_leaf`); everything else equals the imported base model.
An adapter directory keeps just those leaves and says which base they belong to:

- `adapter.safetensors`: the adapter leaves, one tensor per leaf, named by pytree path
  (`head/...`, `lora/<kernel path>/a`, `model/.../latents/...`);
- `adapter.json`: format version; the base (how it was imported; its files' names, sizes and
  sha256; the pip package and path it ships in, if any); the run and step it came from;
- `config.yaml`: the run's config; `README.md`: the model card (optional).

Loading an adapter needs the base as a `grc import-hf` directory whose source files have the
recorded sha256 (`check_base`); `grc_jax.convert.adapter.ensure_base` prepares one from the
recorded source. `load_adapter` then rebuilds the run's `GRCParams` exactly: the base's transformer
with the adapter's leaves in place.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from grc_jax.core.config import (
    EXECUTION_FIELDS,
    Config,
    load_config,
    model_differences,
    save_config,
)
from grc_jax.core.errors import ModelLoadError
from grc_jax.core.trees import path_names
from grc_jax.model.params import GRCParams, init_grc_params, is_adapter_leaf

FORMAT = "grc-adapter"
VERSION = 1
TENSORS = "adapter.safetensors"
INFO = "adapter.json"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / INFO).is_file()


def adapter_tensors(params: GRCParams) -> dict[str, np.ndarray]:
    """The adapter leaves of `params` as float32 numpy arrays, by `/`-joined path."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = path_names(path)
        if is_adapter_leaf(names):
            out["/".join(names)] = np.asarray(jax.device_get(leaf), np.float32)
    return out


def frozen_differences(params: GRCParams, base_model: Any, limit: int = 3) -> list[str]:
    """Paths of transformer leaves (not adapter leaves) where `params` differs from the base."""
    base = dict(
        ("/".join(("model", *path_names(p))), leaf)
        for p, leaf in jax.tree_util.tree_flatten_with_path(base_model)[0]
    )
    diffs = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params.model)[0]:
        names = ("model", *path_names(path))
        if is_adapter_leaf(names):
            continue
        key = "/".join(names)
        if key not in base or not np.array_equal(np.asarray(leaf), np.asarray(base[key])):
            diffs.append(key)
            if len(diffs) >= limit:
                break
    return diffs


def base_cache_dir(info: dict[str, Any], scan_layers: bool, num_latents: int) -> Path:
    """Where `ensure_base` keeps the base import of an adapter: under `$GRC_JAX_CACHE` (default
    `~/.cache/grc_jax`), `bases/<key>`, the key a hash of the base files' sha256, the layer
    layout and the latent table's size, so adapters of one base share it."""
    root = Path(os.environ.get("GRC_JAX_CACHE") or "~/.cache/grc_jax").expanduser()
    shas = sorted(str(f["sha256"]) for f in info["base"]["files"])
    layout = [shas, bool(scan_layers), int(num_latents)]
    key = hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]
    return root / "bases" / key


def read_info(path: str | Path) -> dict[str, Any]:
    """`adapter.json` of `path`, checked for its format and version."""
    path = Path(path)
    file = path / INFO
    try:
        info = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"adapter {str(path)!r}: cannot read {INFO} ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ModelLoadError(f"adapter {str(path)!r}: {INFO} is not a {FORMAT} file")
    if info.get("version") != VERSION:
        raise ModelLoadError(
            f"adapter {str(path)!r}: {INFO} has version {info.get('version')!r}; this grc_jax "
            f"reads version {VERSION}"
        )
    base = info.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("files"), list) or not base["files"]:
        raise ModelLoadError(f"adapter {str(path)!r}: {INFO} has no 'base.files' list")
    return info


def check_base(adapter: str | Path, base_dir: str | Path, info: dict[str, Any]) -> None:
    """Raise `ModelLoadError` unless `base_dir` is an import of exactly the adapter's base files
    (same names, sizes and sha256, as recorded by `grc import-hf` in `import_info.json`)."""
    base_dir = Path(base_dir)
    record = base_dir / "import_info.json"
    try:
        imported = json.loads(record.read_text())["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelLoadError(
            f"adapter {str(adapter)!r}: base {str(base_dir)!r} is not a `grc import-hf` "
            f"directory ({record.name}: {e})"
        ) from None
    want = {f["name"]: f["sha256"] for f in info["base"]["files"]}
    got = {f.get("name"): f.get("sha256") for f in imported}
    if want != got:
        raise ModelLoadError(
            f"adapter {str(adapter)!r} was trained on another base: it expects "
            f"{_describe(want)}, {str(base_dir)!r} was imported from {_describe(got)}"
        )


def _describe(files: dict[str, str]) -> str:
    return ", ".join(f"{name} (sha256 {str(sha)[:12]}...)" for name, sha in sorted(files.items()))


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    file = path / TENSORS
    if not file.is_file():
        raise ModelLoadError(f"adapter {str(path)!r}: {TENSORS} is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"adapter {str(path)!r}: {TENSORS} is not readable ({e})") from None


def load_adapter(
    path: str | Path, base_cfg: Config, base_model: Any
) -> tuple[Config, GRCParams]:
    """(config, params) of the adapter at `path` over the base transformer `base_model` (already
    checked with `check_base`). Every adapter leaf must be present with its shape; nothing else."""
    path = Path(path)
    cfg = load_config(path / "config.yaml")
    # Execution options do not change the parameters; the scanned layers do change the LoRA
    # factors' shapes (the base is imported with the adapter's).
    skip = tuple(f for f in EXECUTION_FIELDS if f != "scan_layers")
    diff = model_differences(base_cfg.model, cfg.model, ("base", "adapter"), skip)
    if diff:
        raise ModelLoadError(
            f"adapter {str(path)!r}: its model config differs from its base's: {'; '.join(diff)}"
        )
    tensors = _read_tensors(path)
    # The structure (head, LoRA targets, latent table) from a fresh init over the base.
    template = init_grc_params(cfg, jax.random.key(0), base_model)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out, missing = [], []
    for p, leaf in leaves:
        names = path_names(p)
        key = "/".join(names)
        if not is_adapter_leaf(names):
            out.append(leaf)
            continue
        if key not in tensors:
            missing.append(key)
            continue
        value = tensors.pop(key)
        if value.shape != leaf.shape:
            raise ModelLoadError(
                f"adapter {str(path)!r}: tensor {key!r} has shape {value.shape}, the model "
                f"expects {tuple(leaf.shape)}"
            )
        out.append(jax.numpy.asarray(value, leaf.dtype))
    if missing or tensors:
        raise ModelLoadError(
            f"adapter {str(path)!r}: {TENSORS} does not match the config: missing "
            f"{missing[:3]}, unexpected {sorted(tensors)[:3]}"
        )
    return cfg, jax.tree_util.tree_unflatten(treedef, out)


def write_adapter(
    params: GRCParams, cfg: Config, out: str | Path, base: dict[str, Any], source: dict[str, Any]
) -> dict[str, Any]:
    """Write the adapter of `params` (a frozen-base run's, see `frozen_differences`) to `out`:
    tensors, `adapter.json` (`base` as described in the module docstring, `source`: the run and
    step) and `config.yaml`. Returns the written info (with `num_params` and `bytes`)."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(params)
    save_file(tensors, str(out / TENSORS), metadata={"format": FORMAT})
    save_config(cfg, out / "config.yaml")
    info = {
        "format": FORMAT,
        "version": VERSION,
        "base": base,
        "source": source,
        "num_params": int(sum(t.size for t in tensors.values())),
        "bytes": (out / TENSORS).stat().st_size,
    }
    (out / INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info
