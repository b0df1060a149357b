"""`grc train`: the training loop with progress, TensorBoard, checkpoints, resume and eval.

A run lives in `<train.output_dir>/<train.run_name>/`: `config.yaml`, `tokenizer.model` (trained
here for from-scratch runs), `checkpoints/<step>/`, `tb/` (TensorBoard) and `eval/*.json`.
Re-running the same command resumes from the newest checkpoint (model, optimizer and data position).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from grc_jax.checkpoints import RunCheckpoints, load_imported, run_dir
from grc_jax.core.config import Config, save_config
from grc_jax.core.errors import CheckpointError, ConfigError, NonFiniteLossError
from grc_jax.core.sharding import make_mesh
from grc_jax.data.pipeline import train_dataset
from grc_jax.data.sources import open_source, read_records
from grc_jax.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from grc_jax.train.evaluate import Evaluator
from grc_jax.train.flops import measure_matmul_flops, train_flops_per_step
from grc_jax.train.state import create_state
from grc_jax.train.step import batch_shardings, make_train_step


def prepare_tokenizer(cfg: Config, directory: Path) -> Tokenizer:
    """The run's tokenizer: `data.tokenizer`, the imported model's, or one trained on the data."""
    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    if cfg.train.init_from:
        return load_tokenizer(cfg.train.init_from)
    model = directory / "tokenizer.model"
    if not model.exists():
        texts = []
        for r in read_records(cfg.data.train_path):
            texts += [r.query, r.reasoning, f"answer : {r.answer}", r.positive, *r.negatives]
        tok = train_sentencepiece(texts, directory / "tokenizer", cfg.model.vocab_size)
    else:
        tok = load_tokenizer(model)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}"
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


def _eval_params(params: Any) -> Any:
    """Parameters that process 0 can evaluate alone. Call on every process: with several, the
    sharded arrays are gathered to host memory (a collective), so the evaluation that follows on
    process 0 issues no collective the other processes would have to join."""
    if jax.process_count() == 1:
        return params
    from jax.experimental.multihost_utils import process_allgather

    return process_allgather(params, tiled=True)


def _global_batch(batch: dict[str, np.ndarray], shardings: dict[str, Any]) -> dict[str, jax.Array]:
    """The global batch (identical on every process) as sharded arrays: each process places only
    the rows that its own devices hold."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
        batch,
        shardings,
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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _load_init(cfg: Config):
    if not cfg.train.init_from:
        return None
    imported_cfg, params = load_imported(cfg.train.init_from)
    if imported_cfg.model != cfg.model:
        raise ValueError(
            f"train.init_from={cfg.train.init_from!r}: its model config differs from this run's "
            "model section; start from the imported config.yaml"
        )
    return params


def train(cfg: Config, max_steps: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """Train (or resume) the run of `cfg`; returns the final eval metrics with the untrained ones.

    `max_steps` stops early after that many steps in total (used by tests to stop mid-run).
    """
    from tqdm import tqdm

    directory = run_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main:
        save_config(cfg, directory / "config.yaml")
    tok = _shared_tokenizer(cfg, directory)
    if cfg.train.export_every:  # refuse a model HF cannot express now, not after N steps
        from grc_jax.convert.export import check_exportable

        check_exportable(cfg.model)
    mesh = make_mesh(cfg.mesh)
    state, shardings = create_state(cfg, mesh, jax.random.key(cfg.train.seed), _load_init(cfg))
    # Every process reads the same record stream and packs the same global batch, then places
    # only its devices' rows (`_global_batch`). The batches, and the one data-iterator state that
    # is checkpointed, are then the same for any number of processes: a run resumes exactly on a
    # slice of another size, and N processes compute what one process with as many devices does.
    ds, parser = train_dataset(cfg, tok, open_source(cfg.data.train_path))
    data_iter = iter(ds)
    ckpts = RunCheckpoints(directory / "checkpoints", cfg.train.keep_checkpoints)
    start = 0
    if cfg.train.resume == "never" and ckpts.latest_step() is not None:
        raise ConfigError(
            f"train.resume=never but {ckpts.directory} holds checkpoints "
            f"{ckpts.all_steps()}; choose a new train.run_name or remove them"
        )
    if cfg.train.resume == "required" and ckpts.latest_step() is None:
        raise CheckpointError(f"train.resume=required but {ckpts.directory} holds no checkpoint")
    if ckpts.latest_step() is not None:
        state, data_state, start = ckpts.restore(None, state)
        data_iter.set_state(data_state)
        if not quiet and is_main:
            print(f"resumed {directory} at step {start}")

    # Only process 0 evaluates (parameters gathered to it), so only it reads data.eval_path.
    evaluator: Any = None
    if is_main:
        evaluator = Evaluator(cfg, tok, read_records(cfg.data.eval_path, cfg.train.eval_queries))
    eval_dir = directory / "eval"
    eval_dir.mkdir(exist_ok=True)
    logger = Logger(directory / "tb", is_main)
    untrained_file = eval_dir / "untrained.json"
    if start == 0:
        params = _eval_params(state.params)
        if is_main:
            untrained = evaluator.run(params)
            untrained_file.write_text(json.dumps(untrained, indent=2))
            logger.scalars(0, {f"eval/{k}": v for k, v in untrained.items()})

    first = next(data_iter)
    bsh = batch_shardings(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), first), mesh
    )
    step_fn = make_train_step(cfg, mesh, shardings, bsh)
    flops_per_step = train_flops_per_step(cfg, first["tokens"].shape[0])
    peak = measure_matmul_flops(mesh)
    end = cfg.train.steps if max_steps is None else min(cfg.train.steps, max_steps)
    bar = tqdm(total=end, initial=start, disable=quiet or not is_main, desc="train", unit="step")
    pending = first
    last_log = time.perf_counter()
    tokens_since = steps_since = 0
    step = start
    try:
        while step < end:
            batch = pending if pending is not None else next(data_iter)
            pending = None
            tokens_since += int(np.sum(batch["segment_ids"] != 0))
            state, metrics = step_fn(state, _global_batch(batch, bsh))
            step += 1
            steps_since += 1
            is_log = step % cfg.train.log_every == 0 or step == end
            # A preemption notice (SIGTERM to any process, with jax.distributed) makes all
            # processes agree on a step to checkpoint at, then stop; rerunning resumes there.
            preempted = ckpts.manager.reached_preemption(step)
            is_ckpt = step % cfg.train.checkpoint_every == 0 or step == end or preempted
            if is_log or is_ckpt:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not math.isfinite(m["loss/total"]) or m["params_finite"] != 1.0:
                    what = "loss" if not math.isfinite(m["loss/total"]) else "parameter update"
                    raise NonFiniteLossError(
                        f"non-finite {what} at step {step} (gen={m['loss/gen']}, "
                        f"rep={m['loss/rep']}, comp={m['loss/comp']}); stopping. The last good "
                        f"checkpoint (step {ckpts.latest_step()}) in {ckpts.directory} is intact; "
                        "lower train.learning_rate or check the data"
                    )
                now = time.perf_counter()
                dt = (now - last_log) / steps_since
                m["tokens_per_s"] = tokens_since / (now - last_log)
                m["step_time_s"] = dt
                m["mfu"] = flops_per_step / dt / peak
                last_log, tokens_since, steps_since = now, 0, 0
                logger.scalars(step, m)
                if is_main:
                    with (directory / "metrics.jsonl").open("a") as f:
                        f.write(json.dumps({"step": step, **m}) + "\n")
                bar.set_postfix(
                    gen=f"{m['loss/gen']:.3f}", rep=f"{m['loss/rep']:.3f}",
                    comp=f"{m['loss/comp']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}",
                )  # fmt: skip
            bar.update(1)
            if is_ckpt:
                ckpts.save(step, state, data_iter.get_state())
            if cfg.train.export_every and step % cfg.train.export_every == 0:
                from grc_jax.convert.export import export_during_training

                export_during_training(cfg, state.params, tok, directory, step)  # process 0 writes
            if preempted:
                if is_main:
                    print(f"preemption notice: saved checkpoint {step}, stopping", flush=True)
                break
            if step % cfg.train.eval_every == 0 and step != end:
                params = _eval_params(state.params)
                if is_main:
                    ev = evaluator.run(params)
                    (eval_dir / f"step_{step}.json").write_text(json.dumps(ev, indent=2))
                    logger.scalars(step, {f"eval/{k}": v for k, v in ev.items()})
    finally:
        bar.close()
        ckpts.close()
        logger.close()

    result: dict[str, Any] = {"step": step, "bad_lines_skipped": parser.bad_lines}
    params = _eval_params(state.params) if step == cfg.train.steps else None
    if step == cfg.train.steps and is_main:
        final = evaluator.run(params)
        (eval_dir / "final.json").write_text(json.dumps(final, indent=2))
        logger = Logger(directory / "tb", True)
        logger.scalars(step, {f"eval/{k}": v for k, v in final.items()})
        logger.close()
        result["final"] = final
        if untrained_file.exists():
            result["untrained"] = json.loads(untrained_file.read_text())
    result["state"] = state
    return result


def summary_table(untrained: dict[str, float], final: dict[str, float]) -> str:
    keys = [
        "retrieval/ndcg@10", "retrieval/recall@1", "retrieval/recall@10",
        "retrieval_self_reason/ndcg@10", "retrieval_self_reason/recall@1",
        "compression/token_accuracy", "generation/exact_match",
    ]  # fmt: skip
    lines = [f"{'metric':34s} {'untrained':>10s} {'trained':>10s}"]
    for k in keys:
        lines.append(
            f"{k:34s} {untrained.get(k, float('nan')):10.4f} {final.get(k, float('nan')):10.4f}"
        )
    return "\n".join(lines)
