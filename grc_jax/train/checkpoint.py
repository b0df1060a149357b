"""Orbax checkpoints of a training run: train state + data-iterator state in the same step.

Saves are asynchronous and keep the newest `train.keep_checkpoints`. Restoring never falls back to
a fresh start silently: a checkpoint directory that exists but cannot be read is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint is missing or cannot be restored."""


class RunCheckpoints:
    """The checkpoints of one run directory (`<run>/checkpoints/<step>/{state,data}`)."""

    def __init__(self, directory: str | Path, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict[str, Any], int]:
        """Restore (state, data-iterator state, step); `abstract_state` carries target shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint to resume from in {self.directory}")
        if step not in self.all_steps():
            raise CheckpointError(
                f"checkpoint step {step} does not exist in {self.directory}; "
                f"available: {self.all_steps()}"
            )
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state
        )
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # orbax raises many types for unreadable/corrupt files
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be restored "
                f"({type(e).__name__}: {e}); refusing to start fresh over it"
            ) from e
        return restored["state"], restored["data"], step

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
