"""Checkpoint integrity: a per-step manifest (size and sha256 of every file) and its checks.

`RunCheckpoints` writes `<run>/checkpoints/<step>/grc_manifest.json` from Orbax's background
commit thread, after every item of the step is written and finalized and just before Orbax
publishes the step by renaming its temporary directory: a committed step therefore always carries
its manifest (no window in which it exists unverified), and the training thread never waits for
the hashing. Orbax rewrites two of its own step-level files while committing
(`_CHECKPOINT_METADATA`, `commit_success.txt`); they are left out of the manifest, which covers
every file of the saved items (`state/`, `data/`), i.e. all of the checkpoint's data.

A restore checks the step's manifest (`check_step`) and then that every restored parameter is
finite (`nonfinite_paths`). A step without a manifest is accepted, unverified, when it predates
manifests (no older step of the run has one); otherwise its manifest was lost and it is damaged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp

from grc_jax.core.trees import path_names

MANIFEST = "grc_manifest.json"
# Step-level files Orbax writes or rewrites during the commit itself, after the manifest.
_COMMIT_FILES = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt"})
_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)  # hashlib releases the GIL on large buffers
    return h.hexdigest()


def _files(step_dir: Path) -> list[str]:
    names = []
    for p in step_dir.rglob("*"):
        rel = p.relative_to(step_dir).as_posix()
        if p.is_file() and rel not in _COMMIT_FILES and not rel.startswith(MANIFEST):
            names.append(rel)
    return sorted(names)


def write_manifest(step_dir: Path, step: int) -> None:
    """Hash every file of the step's items into `<step_dir>/grc_manifest.json` (written last,
    atomically: a temporary file renamed into place)."""
    files = {}
    for rel in _files(step_dir):
        path = step_dir / rel
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    record = {"format": 1, "step": step, "hash": "sha256", "files": files}
    tmp = step_dir / f"{MANIFEST}.tmp"
    with tmp.open("w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / MANIFEST)


def manifest_problem(step_dir: Path) -> str | None:
    """What is wrong with the files of a step against its manifest; None when they all match.
    The manifest must exist (see `check_step`)."""
    try:
        record = json.loads((step_dir / MANIFEST).read_text())
        files = record["files"]
        assert isinstance(files, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        return f"its manifest {MANIFEST} is unreadable ({type(e).__name__})"
    problems = []
    for rel, want in files.items():
        path = step_dir / rel
        if not path.is_file():
            problems.append(f"file {rel} is missing")
            continue
        size = path.stat().st_size
        if size < want["size"]:
            problems.append(f"file {rel} is truncated ({size} of {want['size']} bytes)")
        elif size != want["size"]:
            problems.append(f"file {rel} changed size ({size} bytes, {want['size']} recorded)")
        elif _sha256(path) != want["sha256"]:
            problems.append(f"file {rel} changed (its sha256 differs from the manifest)")
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more damaged files)" if len(problems) > 1 else ""
    return problems[0] + more


@dataclasses.dataclass(frozen=True)
class StepCheck:
    """The outcome of `check_step`: `verified` (manifest matches), `unverified` (written before
    manifests existed) or `damaged` (`problem` says what)."""

    status: Literal["verified", "unverified", "damaged"]
    problem: str = ""


def check_step(checkpoints: str | Path, step: int, steps: Sequence[int]) -> StepCheck:
    """Check checkpoint `step` of the directory `checkpoints` (holding `steps`) by its manifest."""
    step_dir = Path(checkpoints) / str(step)
    if not (step_dir / MANIFEST).is_file():
        if any((Path(checkpoints) / str(s) / MANIFEST).is_file() for s in steps if s < step):
            return StepCheck(
                "damaged",
                f"its manifest {MANIFEST} is missing (older checkpoints of this run have one)",
            )
        return StepCheck("unverified")
    problem = manifest_problem(step_dir)
    return StepCheck("damaged", problem) if problem else StepCheck("verified")


def older_usable_step(checkpoints: str | Path, step: int, steps: Sequence[int]) -> int | None:
    """The newest step before `step` whose files pass `check_step` (verified or unverified)."""
    for s in sorted((s for s in steps if s < step), reverse=True):
        if check_step(checkpoints, s, steps).status != "damaged":
            return s
    return None


def damaged_message(checkpoints: str | Path, step: int, steps: Sequence[int], problem: str) -> str:
    """One line: which step, what is wrong, and how to go on (an older usable step, if any)."""
    older = older_usable_step(checkpoints, step, steps)
    if older is None:
        how = "no older checkpoint of this run is usable; start a new run (another train.run_name)"
    else:
        how = (
            f"the newest older usable checkpoint is step {older}: resume training from it with "
            f"train.resume_step={older}, or load it with --step {older}"
        )
    return (
        f"checkpoint step {step} ({Path(checkpoints) / str(step)}) cannot be restored: {problem}; "
        f"{how}"
    )


def warn_unverified(checkpoints: str | Path, step: int) -> None:
    print(
        f"warning: checkpoint step {step} in {checkpoints} has no {MANIFEST} (written before "
        "checkpoints were verified); restoring it unverified",
        file=sys.stderr,
        flush=True,
    )


def nonfinite_paths(tree: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the floating-point leaves of `tree` holding a NaN or an infinity. Works on
    sharded arrays (call it on every process: the reductions are collectives)."""
    leaves = [
        (path, x)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    finite = jax.jit(lambda xs: [jnp.isfinite(x).all() for x in xs])([x for _, x in leaves])
    finite = jax.device_get(finite)
    return [
        ".".join((prefix, *path_names(path)) if prefix else path_names(path))
        for (path, _), ok in zip(leaves, finite)
        if not ok
    ]


def nonfinite_message(
    checkpoints: str | Path, step: int, steps: Sequence[int], bad: list[str]
) -> str:
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return damaged_message(checkpoints, step, steps, f"non-finite params in {bad[0]}{more}")
