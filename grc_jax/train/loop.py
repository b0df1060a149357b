"""`grc train`: the training loop with progress, TensorBoard, checkpoints, resume and eval.

`setup_run` builds a `Run` (run directory, tokenizer, sharded state, data iterator, checkpoints,
evaluator, logger, jitted step); `train` takes its steps, after each one calling the hooks of
`grc_jax.train.hooks` that are due (finite check, metrics log, checkpoint and preemption, periodic
eval, and the caller's, e.g. the periodic export of `grc_jax.convert.export.export_hooks`), then
runs the final eval.

A run lives in `<train.output_dir>/<train.run_name>/`: `config.yaml`, `tokenizer.model` (trained
here for from-scratch runs), `checkpoints/<step>/`, `tb/` (TensorBoard) and `eval/*.json`.
Re-running the same command resumes from the newest checkpoint (model, optimizer and data position).

`train` holds the run lock (`<run>/.lock`, `grc_jax.train.run_lock`) throughout. Nothing is
written to the run directory before the state is restored (or a fresh start is decided): a resume
that would change the parameters (`grc_jax.train.resume`), a damaged checkpoint or a busy run
leaves the run as it was. See docs/reliability.md.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from grc_jax.checkpoints import RunCheckpoints, load_imported, run_dir
from grc_jax.core.batch import Batch
from grc_jax.core.config import Config, model_differences, save_config
from grc_jax.core.errors import CheckpointError, ConfigError, UserError
from grc_jax.core.processes import gather_json, raise_together, sum_over_processes
from grc_jax.core.sharding import check_batch_sharding, make_mesh
from grc_jax.data.pipeline import train_dataset
from grc_jax.data.sources import CountedSource, open_source, read_records, scan_records
from grc_jax.data.tokenizer import (
    Tokenizer,
    VocabTooSmallError,
    load_tokenizer,
    train_sentencepiece,
)
from grc_jax.model import stack_layers, unstack_layers
from grc_jax.train.evaluate import Evaluator
from grc_jax.train.flops import measure_matmul_flops, train_flops_per_step
from grc_jax.train.hooks import Hook, Logger, Tick, default_hooks, record_eval
from grc_jax.train.preemption import SigtermNotice
from grc_jax.train.resume import check_saved_config, drop_rows_after, resume_target
from grc_jax.train.run_lock import lock_run
from grc_jax.train.state import TrainState, create_state
from grc_jax.train.step import batch_shardings, make_train_step, row_sharding


def prepare_tokenizer(cfg: Config, directory: Path) -> Tokenizer:
    """The run's tokenizer: `data.tokenizer`, the imported model's, or one trained on the data
    (its records read with `data.skip_bad_lines`; data without a usable record is a `DataError`).
    A tokenizer larger than `model.vocab_size` is a `ConfigError`."""
    model = directory / "tokenizer.model"
    if cfg.data.tokenizer or cfg.train.init_from:
        tok = load_tokenizer(cfg.data.tokenizer or cfg.train.init_from)
    elif not model.exists():
        texts = []
        for r in scan_records(cfg.data.train_path, cfg.data.skip_bad_lines)[0]:
            texts += [r.query, r.reasoning, f"answer : {r.answer}", r.positive, *r.negatives]
        try:
            tok = train_sentencepiece(texts, directory / "tokenizer", cfg.model.vocab_size)
        except VocabTooSmallError as e:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} is too small for a tokenizer of "
                f"{cfg.data.train_path}: {e.why}"
            ) from None
    else:
        tok = load_tokenizer(model)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{tok.vocab_size} tokens ({getattr(tok, 'path', model)}); set model.vocab_size to "
            f"at least {tok.vocab_size}"
        )
    return tok


def _shared_tokenizer(cfg: Config, directory: Path) -> Tokenizer:
    """`prepare_tokenizer` with several processes: process 0 trains and writes the model first;
    the others then load it (or, without a shared filesystem, train the same one: deterministic),
    so no two processes write the same file at once."""
    if jax.process_count() == 1:
        return prepare_tokenizer(cfg, directory)
    from jax.experimental.multihost_utils import sync_global_devices

    tok = prepare_tokenizer(cfg, directory) if jax.process_index() == 0 else None
    sync_global_devices("grc_jax: tokenizer ready")
    return tok if tok is not None else prepare_tokenizer(cfg, directory)


def global_batch(batch: Batch, shardings: Batch) -> Batch:
    """The global batch as sharded arrays, from this process's rows (its share of the batch, see
    `check_local_rows`): each process supplies the rows that its own devices hold."""
    n = jax.process_count()
    return jax.tree.map(
        lambda x, s: jax.make_array_from_process_local_data(s, x, (x.shape[0] * n, *x.shape[1:])),
        batch,
        shardings,
    )


def check_local_rows(mesh: Mesh, rows: int) -> None:
    """Refuse a mesh on which this process's devices do not hold exactly its share (`rows` /
    processes) of the `rows` rows of a batch: each process packs only its own rows, so the batch
    axis must be split evenly over the processes (not replicated over them, as a mesh that is
    tensor-parallel across hosts would have it)."""
    local = rows // jax.process_count()
    index = row_sharding((rows,), mesh).addressable_devices_indices_map((rows,))
    held = {(s[0].start or 0, rows if s[0].stop is None else s[0].stop)
            for s in index.values()}  # fmt: skip
    n = sum(stop - start for start, stop in held)
    if n != local:
        raise ConfigError(
            f"process {jax.process_index()} of {jax.process_count()}: its devices hold {n} of "
            f"the {rows} rows of a batch, but each process packs its own {local} "
            "(data.batch_size / processes); choose mesh.data and mesh.fsdp so that the batch "
            "rows are split evenly over the processes (docs/multihost.md)"
        )


def _load_init(cfg: Config):
    """The imported transformer params of `train.init_from`, in this run's layer layout."""
    if not cfg.train.init_from:
        return None
    imported_cfg, params = load_imported(cfg.train.init_from)
    diffs = model_differences(imported_cfg.model, cfg.model, ("imported", "this run"))
    k = params["latents"].shape[0]
    if k != cfg.grc.num_latents:
        diffs.append(f"grc.num_latents: {k} (imported latent table) -> {cfg.grc.num_latents}")
    if diffs:
        raise ConfigError(
            f"train.init_from={cfg.train.init_from!r}: this run's config does not match the "
            f"imported model ({'; '.join(diffs)}); start from the imported config.yaml"
        )
    n = cfg.model.n_layers
    if cfg.model.scan_layers and not imported_cfg.model.scan_layers:
        params = stack_layers(params, n)
    elif imported_cfg.model.scan_layers and not cfg.model.scan_layers:
        params = unstack_layers(params, n)
    return params


# ------------------------------------------------------------------------- batch access
# The one place that knows a batch's layout (a dict of arrays).


# ------------------------------------------------------------------------------- set-up


@dataclasses.dataclass
class Run:
    """Everything the loop and its hooks work with; `state` is replaced after every step."""

    cfg: Config
    directory: Path
    tok: Tokenizer
    mesh: Mesh
    state: TrainState
    shardings: TrainState
    data_iter: Any  # the grain iterator: `next`, `get_state`, `set_state`
    parser: Any  # counts the bad lines skipped
    source: Any  # `CountedSource`: counts the training records this process has read
    ckpts: RunCheckpoints
    evaluator: Any  # `Evaluator` on process 0, None elsewhere
    logger: Logger
    step_fn: Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]
    start: int  # steps done before this run of the loop (resumed from a checkpoint)
    end: int  # the step the loop stops at
    batch_shardings: Any
    flops_per_step: float
    peak_flops: float  # measured matmul FLOP/s, for MFU
    quiet: bool  # no progress bar
    first_batch: Any = None  # fetched to learn the batch shapes; trained on first
    bar: Any = None  # the tqdm progress bar, while the loop runs
    sigterm: SigtermNotice | None = None  # single process: a SIGTERM makes a preemption step

    def next_batch(self) -> Any:
        batch, self.first_batch = self.first_batch, None
        return batch if batch is not None else next(self.data_iter)


def _resume(cfg: Config, saved: Config | None, ckpts: RunCheckpoints, state: Any, data_iter: Any):
    """(state, start step) after applying `train.resume` and `train.resume_step` to the run's
    checkpoints (checked against their manifests, restored floats checked finite)."""
    steps = ckpts.all_steps()
    if cfg.train.resume == "never" and steps:
        raise ConfigError(
            f"train.resume=never but {ckpts.directory} holds checkpoints "
            f"{steps}; choose a new train.run_name or remove them"
        )
    if cfg.train.resume == "required" and not steps:
        raise CheckpointError(f"train.resume=required but {ckpts.directory} holds no checkpoint")
    target = resume_target(cfg, saved, steps)
    if target is None:
        return state, 0
    state, data_state, start = ckpts.restore(target, state)
    moved = ckpts.set_aside_after(start)  # resume_step: the newer ones would be saved again
    if moved and jax.process_index() == 0:
        print(
            f"train.resume_step={start}: moved the newer checkpoints {moved} to "
            f"{ckpts.directory}.set_aside",
            flush=True,
        )
    data_iter.set_state(data_state)
    return state, start


def setup_run(cfg: Config, max_steps: int | None = None, quiet: bool = False) -> Run:
    """The run of `cfg`, ready for its first step: run directory, tokenizer, state (restored
    when resuming), data iterator, checkpoints, evaluator, the jitted step, and an open logger
    (closed by `train`). config.yaml is written once the state is restored (or a fresh start
    decided), with `metrics.jsonl` cut back to the restored step."""
    directory = run_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    saved = check_saved_config(cfg, directory)  # before anything is written
    tok = _shared_tokenizer(cfg, directory)
    mesh = make_mesh(cfg.mesh)
    check_batch_sharding(cfg, mesh.size)
    # Each process reads and packs only its own share of the records (every N-th, groups whole)
    # into its rows of the global batch (`global_batch`), so input I/O per host does not grow
    # with the number of hosts. Each checkpoints its own data position; a run resumes with the
    # process count it was saved with (docs/multihost.md). Every record of the share is checked
    # here, before any state is built (`check_all`); a process that finds a bad one stops all.
    source = CountedSource(open_source(cfg.data.train_path))
    ds = parser = error = None
    try:
        check_local_rows(mesh, cfg.data.batch_size)
        ds, parser = train_dataset(
            cfg, tok, source, jax.process_index(), jax.process_count(), check_all=True
        )
    except UserError as e:
        error = e
    raise_together(error)
    if jax.process_count() > 1:
        index, count = jax.process_index(), jax.process_count()
        print(
            f"process {index}/{count}: its share of {cfg.data.train_path} is "
            f"{len(range(index, len(source), count))} of {len(source)} records",
            flush=True,
        )
    state, shardings = create_state(cfg, mesh, jax.random.key(cfg.train.seed), _load_init(cfg))
    data_iter = iter(ds)
    ckpts = RunCheckpoints(directory / "checkpoints", cfg.train.keep_checkpoints)
    state, start = _resume(cfg, saved, ckpts, state, data_iter)
    if is_main:
        drop_rows_after(directory / "metrics.jsonl", start)  # steps the resumed run redoes
        save_config(cfg, directory / "config.yaml")
    if start and not quiet and is_main:
        print(f"resumed {directory} at step {start}")
    # Only process 0 evaluates (parameters gathered to it), so only it reads data.eval_path.
    evaluator = None
    if is_main:
        records = read_records(cfg.data.eval_path, cfg.train.eval_queries, cfg.data.skip_bad_lines)
        evaluator = Evaluator(cfg, tok, records)
    (directory / "eval").mkdir(exist_ok=True)

    first = next(data_iter)
    # The global batch's shapes: this process's rows are 1 / process_count of them.
    shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((x.shape[0] * jax.process_count(), *x.shape[1:]), x.dtype),
        first,
    )
    bsh = batch_shardings(shapes, mesh)
    step_fn = make_train_step(cfg, mesh, shardings, bsh)
    flops_per_step = train_flops_per_step(cfg, shapes.tokens.shape[0])
    peak_flops = measure_matmul_flops(mesh)
    end = cfg.train.steps if max_steps is None else min(cfg.train.steps, max_steps)
    logger = Logger(directory / "tb", is_main)  # opened last: nothing after it can fail
    logger.purge_after(start)  # TensorBoard hides the earlier events of the steps redone
    return Run(
        cfg=cfg,
        directory=directory,
        tok=tok,
        mesh=mesh,
        state=state,
        shardings=shardings,
        data_iter=data_iter,
        parser=parser,
        source=source,
        ckpts=ckpts,
        evaluator=evaluator,
        logger=logger,
        step_fn=step_fn,
        start=start,
        end=end,
        batch_shardings=bsh,
        flops_per_step=flops_per_step,
        peak_flops=peak_flops,
        quiet=quiet,
        first_batch=first,
    )


# -------------------------------------------------------------------------------- the loop


def _run_steps(run: Run, hooks: Sequence[Hook]) -> int:
    """Steps from `run.start` to `run.end` (or a hook's stop), each followed by the hooks due;
    the step reached. Closes the checkpoints at the end (waiting for the last save)."""
    from tqdm import tqdm

    disable = run.quiet or jax.process_index() != 0
    run.bar = tqdm(total=run.end, initial=run.start, disable=disable, desc="train", unit="step")
    for hook in hooks:
        hook.start(run)
    step, tokens = run.start, 0
    try:
        while step < run.end:
            batch = run.next_batch()
            tokens += int(np.sum(batch.segment_ids != 0))  # this process's rows only
            run.state, metrics = run.step_fn(run.state, global_batch(batch, run.batch_shardings))
            step += 1
            # A preemption notice (SIGTERM to any process, with jax.distributed) makes all
            # processes agree on a step to checkpoint at, then stop; rerunning resumes there.
            # A single process has its own SIGTERM handler (`SigtermNotice`).
            preempted = run.ckpts.manager.reached_preemption(step) or bool(
                run.sigterm and run.sigterm.received
            )
            due = [h for h in hooks if h.schedule.fires(step, run.end, preempted)]
            host = None  # metrics leave the device only when a hook due now reads them
            if any(h.needs_metrics for h in due):
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            tick = Tick(step, run.end, preempted, tokens, host)
            for hook in due:
                hook(run, tick)
            run.bar.update(1)
            if tick.stop:
                break
    finally:
        run.bar.close()
        run.ckpts.close()
    return step


def train(
    cfg: Config, max_steps: int | None = None, quiet: bool = False, hooks: Sequence[Hook] = ()
) -> dict[str, Any]:
    """Train (or resume) the run of `cfg`; returns the final eval metrics with the untrained ones.

    `max_steps` stops early after that many steps in total (used by tests to stop mid-run).
    `hooks` run after the checkpoint hook at the steps their schedules name (e.g. the periodic
    export of `grc_jax.convert.export.export_hooks(cfg)`).
    The run lock is held throughout; a single process saves and stops on SIGTERM.
    """
    with lock_run(run_dir(cfg)), SigtermNotice() as sigterm:
        return _train(cfg, max_steps, quiet, hooks, sigterm)


def _train(
    cfg: Config, max_steps: int | None, quiet: bool, hooks: Sequence[Hook], sigterm: SigtermNotice
) -> dict[str, Any]:
    run = setup_run(cfg, max_steps, quiet)
    run.sigterm = sigterm
    try:
        if run.start == 0:
            record_eval(run, 0, "untrained")
        step = _run_steps(run, default_hooks(cfg.train, hooks))
        # Counted by each process for its share of the records; summed (a collective).
        skipped = sum_over_processes([run.parser.bad_lines])[0]
        result: dict[str, Any] = {
            "step": step,
            "bad_lines_skipped": skipped,
            "records_read": gather_json(run.source.records_read),  # per process
        }
        if step == cfg.train.steps:
            final = record_eval(run, step, "final")  # gathers on every process
            if final is not None:
                result["final"] = final
                untrained_file = run.directory / "eval" / "untrained.json"
                if untrained_file.exists():
                    result["untrained"] = json.loads(untrained_file.read_text())
        result["state"] = run.state
        return result
    finally:
        run.logger.close()


def summary_table(untrained: dict[str, float], final: dict[str, float]) -> str:
    keys = [
        "retrieval/ndcg@10", "retrieval/recall@1", "retrieval/recall@10",
        "retrieval_self_reason/ndcg@10", "retrieval_self_reason/recall@1",
        "compression/token_accuracy", "generation/exact_match",
    ]  # fmt: skip
    lines = [f"{'metric':34s} {'untrained':>10s} {'trained':>10s}"]
    for k in keys:
        if k not in untrained and k not in final:  # e.g. no answers to match
            continue
        lines.append(
            f"{k:34s} {untrained.get(k, float('nan')):10.4f} {final.get(k, float('nan')):10.4f}"
        )
    return "\n".join(lines)
