"""`grc train` (`grc eval` is `grc_jax/cli/evaluate.py`)."""

from __future__ import annotations

import argparse

# JAX and the training modules are imported inside the `run_*` functions (deferred to keep
# `--help` fast).


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop (with a checkpoint) once this many total steps are done, e.g. to test resume",
    )
    p.add_argument(
        "overrides", nargs="*", help="section.key=value config overrides (before or after options)"
    )


def _distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "multi-process (jax.distributed)",
        "Several processes, one per host, train one model together. On a Cloud TPU pod they are "
        "detected automatically; elsewhere give all three flags (or JAX_COORDINATOR_ADDRESS, "
        "JAX_NUM_PROCESSES, JAX_PROCESS_ID). See docs/multihost.md.",
    )
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0's coordinator")
    g.add_argument("--num-processes", type=int, default=None, help="number of processes")
    g.add_argument("--process-id", type=int, default=None, help="this process's id, 0..N-1")
    g.add_argument("--no-distributed", action="store_true", help="single process, even on a TPU VM")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    _distributed_args(p)


def run_train(args: argparse.Namespace) -> int:
    """Train; an unusable checkpoint raises a `UserError` (exit code 2), a non-finite loss a
    `NonFiniteLossError` (exit code 1: the run failed)."""
    from grc_jax.core import distributed
    from grc_jax.core.config import load_config

    cfg = load_config(args.config, args.overrides)
    # Before anything touches a JAX device: jax.distributed refuses to start after that.
    plan = distributed.initialize(
        distributed.plan(
            args.coordinator, args.num_processes, args.process_id, not args.no_distributed
        )
    )
    import jax

    from grc_jax.checkpoints import run_dir
    from grc_jax.convert.export import export_hooks
    from grc_jax.train.loop import summary_table, train

    if plan.mode != "single":
        print(f"{distributed.describe()} ({plan.source})", flush=True)
    if jax.process_index() == 0:
        print(f"run directory: {run_dir(cfg)}")
    result = train(cfg, max_steps=args.stop_after, hooks=export_hooks(cfg))
    if "final" in result:
        print("\nheld-out metrics (eval/final.json):")
        print(summary_table(result.get("untrained", {}), result["final"]))
    read = result.get("records_read", [])
    if len(read) > 1 and jax.process_index() == 0:
        # Each process reads only its share of the records (docs/multihost.md).
        print(
            f"\ntraining records read per process: {read} (distinct records of "
            f"{cfg.data.train_path}, {sum(read)} in all)"
        )
    if result.get("bad_lines_skipped") and jax.process_index() == 0:
        print(
            f"\nskipped {result['bad_lines_skipped']} bad record(s) of {cfg.data.train_path} "
            "(data.skip_bad_lines=true; the first are printed above as they were met, the count "
            "is data/bad_lines_skipped in metrics.jsonl)"
        )
    return 0
