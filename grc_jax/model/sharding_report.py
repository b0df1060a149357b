"""JSON-friendly tables of every parameter's PartitionSpec: what `tests/golden/` records.

`scripts/update_golden.py` writes these tables and `tests/core/test_sharding.py` recomputes and
compares them, both through `golden_document`, so the reviewed files and the test cannot
drift apart.
The meshes need 8 devices (8 simulated CPU devices in tests and in the script).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec

from grc_jax.core.config import GRCConfig, MeshConfig, ModelConfig, load_config
from grc_jax.core.sharding import MESH_AXES, make_mesh, param_specs
from grc_jax.model.transformer import abstract_params

# (data, fsdp, tensor): pure data parallel, data x fsdp, fsdp x tensor, all three.
GOLDEN_MESHES: tuple[tuple[int, int, int], ...] = ((8, 1, 1), (2, 4, 1), (1, 2, 4), (2, 2, 2))
GOLDEN_CONFIGS: tuple[str, ...] = ("tiny", "smollm2_135m", "qwen3_0_6b", "llama3_8b")

SpecEntry = str | list[str] | None


def mesh_key(shape: Sequence[int]) -> str:
    """`(2, 4, 1)` -> `"2x4x1"` (sizes of data, fsdp, tensor)."""
    return "x".join(str(s) for s in shape)


def spec_entries(spec: PartitionSpec, rank: int) -> list[SpecEntry]:
    """A PartitionSpec as a JSON list of length `rank`: null, an axis name, or a list of names."""
    entries: list[SpecEntry] = []
    for part in tuple(spec) + (None,) * (rank - len(spec)):
        entries.append(None if part is None else part if isinstance(part, str) else list(part))
    return entries


def _path(keypath: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def param_spec_table(cfg: ModelConfig, grc: GRCConfig, mesh: Mesh) -> dict[str, dict[str, Any]]:
    """`{"layers/attn/q/kernel": {"shape", "logical", "spec"}}` for every parameter of the model.

    Shapes come from `abstract_params` (eval_shape: nothing is allocated).
    """
    shapes, logical = abstract_params(cfg, grc)
    specs = param_specs(logical, shapes, mesh)
    flat_shapes = dict(jax.tree_util.tree_flatten_with_path(shapes)[0])
    flat_logical = dict(jax.tree_util.tree_flatten_with_path(logical, is_leaf=_is_spec)[0])
    flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec)[0]
    table = {}
    for keypath, spec in flat_specs:
        shape = flat_shapes[keypath].shape
        table[_path(keypath)] = {
            "shape": list(shape),
            "logical": spec_entries(flat_logical[keypath], len(shape)),
            "spec": spec_entries(spec, len(shape)),
        }
    return table


def golden_document(
    config_path: str | Path, meshes: Sequence[Sequence[int]] = GOLDEN_MESHES
) -> dict:
    """The golden JSON for one config: per parameter its shape, logical names and spec per mesh."""
    cfg = load_config(config_path)
    params: dict[str, dict[str, Any]] = {}
    for shape in meshes:
        table = param_spec_table(cfg.model, cfg.grc, make_mesh(MeshConfig(*shape)))
        for path, row in table.items():
            entry = params.setdefault(
                path, {"shape": row["shape"], "logical": row["logical"], "specs": {}}
            )
            entry["specs"][mesh_key(shape)] = row["spec"]
    return {
        "config": Path(config_path).as_posix(),
        "mesh_axes": list(MESH_AXES),
        "meshes": [mesh_key(s) for s in meshes],
        "params": dict(sorted(params.items())),
    }


def diff_documents(golden: dict, actual: dict) -> list[str]:
    """Readable differences, one line per parameter field (empty when the documents agree)."""
    lines = []
    for key in ("config", "mesh_axes", "meshes"):
        if golden.get(key) != actual.get(key):
            lines.append(f"{key}: golden {golden.get(key)!r}, now {actual.get(key)!r}")
    want, got = golden.get("params", {}), actual.get("params", {})
    for path in sorted(set(want) | set(got)):
        if path not in got:
            lines.append(f"{path}: in the golden file but no longer a parameter")
            continue
        if path not in want:
            lines.append(
                f"{path}: new parameter, not in the golden file (spec {got[path]['specs']})"
            )
            continue
        for field in ("shape", "logical"):
            if want[path].get(field) != got[path][field]:
                lines.append(
                    f"{path}: {field} golden {want[path].get(field)}, now {got[path][field]}"
                )
        want_specs, got_specs = want[path].get("specs", {}), got[path]["specs"]
        for mesh in sorted(set(want_specs) | set(got_specs)):
            if want_specs.get(mesh) != got_specs.get(mesh):
                lines.append(
                    f"{path}: spec on mesh {mesh} golden {want_specs.get(mesh)}, "
                    f"now {got_specs.get(mesh)}"
                )
    return lines


def dumps(doc: Any, indent: int = 0) -> str:
    """JSON with one line per parameter field: nested dicts indented, lists kept on one line."""
    if not isinstance(doc, dict):
        return json.dumps(doc)
    if not doc:
        return "{}"
    pad = "  " * (indent + 1)
    items = [f"{pad}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in doc.items()]
    return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
