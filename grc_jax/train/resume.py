"""What a resume checks and repairs before training goes on.

* `check_saved_config`: a resume whose config changes what the checkpoint's parameters are (their
  shapes or their meaning: `PARAM_KEYS`) is refused with a `ConfigError` listing the differing
  keys, before anything is written; other keys (learning rate, steps, cadences, data paths) may
  change, and the new config is then saved.
* `resume_target`: the step to restore (`train.resume_step`, applied once, or the newest).
* `drop_rows_after`: `metrics.jsonl` loses the rows of steps after the restored one, which the
  resumed run computes (and logs) again.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from grc_jax.core.config import Config, load_config
from grc_jax.core.errors import CheckpointError, ConfigError

# Config keys (dotted; a section name covers the whole section) that fix the parameter tree (or
# the optimizer state's) or what the parameters mean. The model section's compute dtype, remat
# policy and attention layout change neither; grc.memory_mode and grc.pooling change how the same
# parameters are used (inference switches them on a trained run), so they may change too.
PARAM_KEYS = (
    "model",
    "grc.num_latents",
    "grc.projection_dim",
    "train.lora_rank",
    "train.freeze_base",  # the optimizer state's structure
    "train.init_from",
    "data.tokenizer",  # the meaning of the embedding rows
)
FREE_MODEL_KEYS = (
    "model.dtype", "model.remat_policy", "model.attention_layout", "model.attention_impl",
    "model.attention_chunk",
)  # fmt: skip


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def _covered(key: str) -> bool:
    if key in FREE_MODEL_KEYS:
        return False
    return any(key == k or key.startswith(k + ".") for k in PARAM_KEYS)


_UNSET = object()


def _show(value: Any) -> str:
    return "<unset>" if value is _UNSET else json.dumps(value)


def param_config_diff(saved: Config, given: Config) -> list[str]:
    """`key: saved (saved) -> given (given)` for each differing key of `PARAM_KEYS`."""
    a, b = _flat(saved.to_dict()), _flat(given.to_dict())
    lines = []
    for key in [*a, *(k for k in b if k not in a)]:
        va, vb = a.get(key, _UNSET), b.get(key, _UNSET)
        if _covered(key) and va != vb:
            lines.append(f"{key}: {_show(va)} (saved) -> {_show(vb)} (given)")
    return lines


def saved_config(directory: Path) -> Config | None:
    """The run's `config.yaml`, or None when there is none."""
    path = directory / "config.yaml"
    if not path.is_file():
        return None
    try:
        return load_config(path)
    except ConfigError as e:
        raise ConfigError(
            f"{path} (the config the run was saved with) cannot be read: {e}; restore it to "
            "resume the run"
        ) from None


def checkpoint_dirs(directory: Path) -> list[int]:
    """Steps of `<run>/checkpoints/<step>` directories (a listing; nothing is opened)."""
    ckpts = directory / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit() and p.is_dir())


def check_saved_config(cfg: Config, directory: Path) -> Config | None:
    """Refuse (`ConfigError`) to resume the run in `directory` with a config that changes its
    parameters; the saved config (None without config.yaml)."""
    saved = saved_config(directory)
    if saved is None or cfg.train.resume == "never" or not checkpoint_dirs(directory):
        return saved
    diff = param_config_diff(saved, cfg)
    if diff:
        more = f"; and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise ConfigError(
            f"cannot resume {directory} with a config that changes its parameters: "
            f"{'; '.join(diff[:4])}{more}. Resume with the saved values (see its config.yaml), "
            "or train a new run (another train.run_name)"
        )
    return saved


def resume_target(cfg: Config, saved: Config | None, steps: list[int]) -> int | None:
    """The checkpoint step to restore: `train.resume_step` the first time it is given (a
    config.yaml that records the same value means it was applied already), else the newest."""
    wanted = cfg.train.resume_step
    if wanted is not None and saved is not None and saved.train.resume_step == wanted:
        if steps and steps[-1] != wanted:
            print(
                f"note: train.resume_step={wanted} was applied by an earlier run (its "
                f"config.yaml records it); resuming from the newest checkpoint, step {steps[-1]}",
                file=sys.stderr,
                flush=True,
            )
        wanted = None
    if wanted is None:
        return steps[-1] if steps else None
    if wanted not in steps:
        raise CheckpointError(
            f"train.resume_step={wanted}: there is no checkpoint at that step; available: {steps}"
        )
    return wanted


def drop_rows_after(path: Path, step: int) -> int:
    """Rewrite the JSONL `path` (atomically) without the rows of steps after `step` and without
    unreadable lines (a line cut by a crash); the number of rows dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            keep = isinstance(row, dict) and int(row["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped
