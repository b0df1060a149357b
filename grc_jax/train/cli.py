"""`grc train` and `grc eval`."""

from __future__ import annotations

import argparse
import json
import sys

from grc_jax.cli import add_command


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop (with a checkpoint) once this many total steps are done, e.g. to test resume",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")


def _train(args: argparse.Namespace) -> int:
    from grc_jax.config import load_config
    from grc_jax.train.checkpoint import CheckpointError
    from grc_jax.train.loop import NonFiniteLossError, run_dir, summary_table, train

    cfg = load_config(args.config, args.overrides)
    print(f"run directory: {run_dir(cfg)}")
    try:
        result = train(cfg, max_steps=args.stop_after)
    except (NonFiniteLossError, CheckpointError) as e:
        print(f"grc train: {e}", file=sys.stderr)
        return 1
    if "final" in result:
        print("\nheld-out metrics (eval/final.json):")
        print(summary_table(result.get("untrained", {}), result["final"]))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    import jax

    from grc_jax.config import load_config
    from grc_jax.sharding import make_mesh
    from grc_jax.train.checkpoint import RunCheckpoints
    from grc_jax.train.evaluate import Evaluator
    from grc_jax.train.loop import _records, prepare_tokenizer
    from grc_jax.train.state import create_state

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a run directory (no config.yaml)")
    cfg = load_config(run / "config.yaml", args.overrides)
    tok = prepare_tokenizer(cfg, run)
    state, _ = create_state(cfg, make_mesh(cfg.mesh), jax.random.key(0))
    ckpts = RunCheckpoints(run / "checkpoints", cfg.train.keep_checkpoints)
    state, _data, step = ckpts.restore(args.step, state)
    ckpts.close()
    data = args.data or cfg.data.eval_path
    metrics = Evaluator(cfg, tok, _records(data, cfg.train.eval_queries)).run(state.params)
    metrics["step"] = step
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run directory written by `grc train` (runs/<name>)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--data", default=None, help="JSONL to evaluate on (default: data.eval_path)")
    p.add_argument("--out", default=None, help="write the metrics JSON here too")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")


add_command("train", "train (or resume) a GRC model from a YAML config", _config_args, _train)
add_command("eval", "evaluate a run's checkpoint on held-out data (JSON)", _eval_args, _eval)
