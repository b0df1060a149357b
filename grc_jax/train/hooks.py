"""Training hooks: what the loop of `grc_jax.train.loop` does after a step, on a schedule.

A hook is a `Hook` with a `Schedule` (every n steps, at the end, on a preemption notice) and a
`__call__(run, tick)`, where `run` is the loop's `Run` (config, run directory, tokenizer, state,
checkpoints, evaluator, logger, ...) and `tick` the step just taken (`Tick`). The loop fetches the
step's metrics from the device only when a hook due at that step sets `needs_metrics`.

The standard hooks (`default_hooks`), in the order they run at a step:

* `CheckFinite`: raises `NonFiniteLossError` on a non-finite loss or parameter update, before
  anything is logged or saved;
* `LogMetrics`: TensorBoard scalars, a `metrics.jsonl` row and the progress bar's postfix, with
  tokens/s, step time and MFU since the previous row and the count of bad records skipped;
* `SaveCheckpoint`: model, optimizer and data position; on a preemption notice it saves, then
  stops the loop;
* hooks supplied by the caller (e.g. the periodic export of `grc_jax.convert.export.export_hooks`);
* `PeriodicEval`: held-out metrics into `eval/step_<n>.json` and TensorBoard.

Multi-process: every hook runs on every process; process 0 alone writes files and logs (the data
counters of every process summed into its rows), and an evaluation gathers the parameters on every
process (`eval_params`) before process 0 evaluates.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

from grc_jax.core.config import TrainConfig
from grc_jax.core.errors import NonFiniteLossError
from grc_jax.core.processes import sum_over_processes

if TYPE_CHECKING:
    from grc_jax.train.loop import Run


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The steps a hook fires at. `step` counts the steps done (1 after the first step)."""

    every: int | tuple[int, ...] = ()  # the multiples of n (of any of several n; 0: none)
    at_end: bool = False  # the loop's last step: train.steps, or max_steps when sooner
    on_preemption: bool = False  # the step a preemption notice makes every process stop at
    skip_last: bool = False  # never on the loop's last step (the end, or a preemption)

    def fires(self, step: int, end: int, preempted: bool) -> bool:
        if self.skip_last and (step == end or preempted):
            return False
        periods = (self.every,) if isinstance(self.every, int) else self.every
        return (
            any(n > 0 and step % n == 0 for n in periods)
            or (self.at_end and step == end)
            or (self.on_preemption and preempted)
        )


@dataclasses.dataclass
class Tick:
    """The step just taken, as the hooks due at it see it."""

    step: int
    end: int  # the loop's last step
    preempted: bool  # a preemption notice names this step (`SaveCheckpoint` saves and stops)
    tokens: int  # non-padding tokens of this process's rows trained on since the loop started
    metrics: dict[str, float] | None  # the step's metrics on the host; None unless requested
    stop: bool = False  # set by a hook: the loop ends after this step's hooks


class Hook:
    """Something done after the steps its `schedule` names; subclasses define `__call__`."""

    needs_metrics: bool = False  # the loop fetches the step's metrics into `tick.metrics`

    def __init__(self, schedule: Schedule):
        self.schedule = schedule

    def start(self, run: Run) -> None:
        """Called once before the loop's first step."""

    def __call__(self, run: Run, tick: Tick) -> None:
        raise NotImplementedError


def _is_main() -> bool:
    return jax.process_index() == 0


# ------------------------------------------------------------------------------ evaluation


def eval_params(params: Any) -> Any:
    """Parameters that process 0 can evaluate alone. Call on every process: with several, the
    sharded arrays are gathered to host memory (a collective), so the evaluation that follows on
    process 0 issues no collective the other processes would have to join."""
    if jax.process_count() == 1:
        return params
    from jax.experimental.multihost_utils import process_allgather

    return process_allgather(params, tiled=True)


def record_eval(run: Run, step: int, name: str) -> dict[str, float] | None:
    """Evaluate `run.state.params` into `<run>/eval/<name>.json` and TensorBoard (`eval/...` at
    `step`). Call on every process; returns the metrics on process 0, None elsewhere."""
    params = eval_params(run.state.params)
    if not _is_main():
        return None
    metrics = run.evaluator.run(params)
    (Path(run.directory) / "eval" / f"{name}.json").write_text(json.dumps(metrics, indent=2))
    run.logger.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    return metrics


# ------------------------------------------------------------------------------ the hooks


class CheckFinite(Hook):
    """Stop with `NonFiniteLossError` on a non-finite loss or parameter update."""

    needs_metrics = True

    def __call__(self, run: Run, tick: Tick) -> None:
        m = tick.metrics
        if math.isfinite(m["loss/total"]) and m["params_finite"] == 1.0:
            return
        what = "loss" if not math.isfinite(m["loss/total"]) else "parameter update"
        good = run.ckpts.newest_verified_step()  # its files match their manifest
        if good is not None:
            where = f"The last good checkpoint (step {good}) in {run.ckpts.directory} is intact"
        elif run.ckpts.latest_step() is not None:
            where = (
                f"The last checkpoint (step {run.ckpts.latest_step()}, unverified: no manifest) "
                f"in {run.ckpts.directory} is left as it was"
            )
        else:
            where = f"No checkpoint was saved in {run.ckpts.directory}"
        raise NonFiniteLossError(
            f"non-finite {what} at step {tick.step} (gen={m['loss/gen']}, "
            f"rep={m['loss/rep']}, comp={m['loss/comp']}); stopping. {where}; "
            "lower train.learning_rate or check the data"
        )


class Logger:
    """TensorBoard scalars (process 0 only; tensorboardX imported lazily: it may import torch)."""

    def __init__(self, directory: Path, enabled: bool):
        self.writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(directory))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def purge_after(self, step: int) -> None:
        """Hide from TensorBoard the events of earlier sessions of this directory at steps after
        `step` (all of them for 0): the resumed run logs those steps again."""
        if self.writer is None:
            return
        files = list(Path(self.writer.logdir).glob("events.out.tfevents.*"))
        if step == 0 and len(files) <= 1:
            return  # a new run: nothing to hide
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        start = SessionLog(status=SessionLog.START)
        self.writer.file_writer.add_event(Event(step=step + 1 if step else 0, session_log=start))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class LogMetrics(Hook):
    """The step's metrics, with `tokens_per_s`, `step_time_s` and `mfu` averaged over the steps
    since the previous row, `data/bad_lines_skipped` (`run.parser`: records skipped under
    `data.skip_bad_lines`) and `data/records_read` (`run.source`: distinct training records read),
    to TensorBoard (`run.logger`), `<run>/metrics.jsonl` and the progress bar (`run.bar`). Tokens
    and both counts are summed over the processes (each counts its own share of the data). The
    `file:line: reason` of the first few records skipped (`run.parser.first_skipped`) are printed,
    each once, at the first row that knows them, by the process that skipped them."""

    needs_metrics = True

    def start(self, run: Run) -> None:
        self._time, self._tokens, self._step = time.perf_counter(), 0, run.start
        self._told = 0  # how many of `run.parser.first_skipped` have been printed

    def __call__(self, run: Run, tick: Tick) -> None:
        now = time.perf_counter()
        dt = (now - self._time) / (tick.step - self._step)
        m = dict(tick.metrics)
        # A collective with several processes: every process runs this hook at the same steps.
        tokens, skipped, read = sum_over_processes(
            [tick.tokens - self._tokens, run.parser.bad_lines, run.source.records_read]
        )
        m["tokens_per_s"] = tokens / (now - self._time)
        m["step_time_s"] = dt
        m["mfu"] = run.flops_per_step / dt / run.peak_flops
        m["data/bad_lines_skipped"] = skipped
        m["data/records_read"] = read
        self._time, self._tokens, self._step = now, tick.tokens, tick.step
        run.logger.scalars(tick.step, m)
        if _is_main():
            with (Path(run.directory) / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"step": tick.step, **m}) + "\n")
        # Each process names the records it skipped itself (on its own output).
        first = run.parser.first_skipped
        for reason in first[self._told :]:
            run.bar.write(f"skipped (data.skip_bad_lines): {reason}")
        if len(first) == run.parser.FIRST > self._told:
            run.bar.write("further skipped records are counted only (data/bad_lines_skipped)")
        self._told = len(first)
        postfix = dict(
            gen=f"{m['loss/gen']:.3f}", rep=f"{m['loss/rep']:.3f}",
            comp=f"{m['loss/comp']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}",
        )  # fmt: skip
        if skipped:
            postfix["skipped"] = str(skipped)
        run.bar.set_postfix(**postfix)


class SaveCheckpoint(Hook):
    """Checkpoint the state and the data position (each process's, in its own share of the
    records); on a preemption notice (SIGTERM to any process, with jax.distributed: all processes
    agree on the step; SIGTERM to a single process: the next step), save, then stop the loop.
    Rerunning the command resumes there."""

    def __call__(self, run: Run, tick: Tick) -> None:
        run.ckpts.save(tick.step, run.state, run.data_iter.get_state())
        if tick.preempted:
            if _is_main():
                print(f"preemption notice: saved checkpoint {tick.step}, stopping", flush=True)
            tick.stop = True


class PeriodicEval(Hook):
    """Held-out metrics into `<run>/eval/step_<n>.json` and TensorBoard."""

    def __call__(self, run: Run, tick: Tick) -> None:
        record_eval(run, tick.step, f"step_{tick.step}")


def default_hooks(cfg: TrainConfig, extra: Sequence[Hook] = ()) -> list[Hook]:
    """The hooks of `train`, with `extra` after the checkpoint and before the periodic eval.

    Metrics are fetched (checked, logged) at every log step, checkpoint step, the end and a
    preemption: a non-finite state is never saved. The periodic eval skips the last step: the
    final eval follows the loop, and a preempted run stops without one.
    """
    fetched = Schedule(every=(cfg.log_every, cfg.checkpoint_every), at_end=True, on_preemption=True)
    saved = Schedule(every=cfg.checkpoint_every, at_end=True, on_preemption=True)
    return [
        CheckFinite(fetched),
        LogMetrics(fetched),
        SaveCheckpoint(saved),
        *extra,
        PeriodicEval(Schedule(every=cfg.eval_every, skip_last=True)),
    ]
