"""`grc aot`: compile the train step for a TPU slice without one (logic in `grc_jax.train.aot`)."""

from __future__ import annotations

import argparse
import json
import os

# JAX and `grc_jax.train.aot` are imported inside `run_aot` (deferred to keep `--help` fast, and
# because the environment below must be set before JAX starts).


def add_aot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("--topology", required=True, help="e.g. v5p-128, v4-32, v6e-64, v5p:4x4x4")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")


def run_aot(args: argparse.Namespace) -> int:
    # Compile-only TPU devices need no TPU: JAX's own backend stays on CPU, and libtpu is told
    # what it would otherwise ask the (absent) TPU metadata server.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if ":" not in args.topology:
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", args.topology)
    from grc_jax.cli._paths import user_paths
    from grc_jax.core.config import load_config
    from grc_jax.train.aot import compile_train_step, report

    cfg = load_config(args.config, args.overrides)
    result = compile_train_step(cfg, args.topology)
    print(report(result))
    if args.json:
        with user_paths(FileNotFoundError), open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
