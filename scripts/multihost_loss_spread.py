"""How far a two-process run's loss is from one process's, against the spread of shuffle seeds.

Per-host input gives N processes other batches than one process with as many devices
(docs/multihost.md, "Per-host input"), so their losses match only statistically. This trains the
tiny model of `tests/train/test_multiprocess.py` on the synthetic data (564 records) with
`grc train`: one process with 8 CPU devices for several `data.shuffle_seed`s, and two processes
with 4 devices each for several seeds, then prints (markdown) the mean loss of the last steps of
each and its difference from one process with seed 0. The test's 2% margin comes from this table.
Run from the repository root (about 5 minutes on 2 cores):

    .venv/bin/python scripts/multihost_loss_spread.py --out /tmp/spread
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grc_jax.data.synth import synthesize  # noqa: E402
from tests.helpers import TINY_MODEL  # noqa: E402

COMMAND = [sys.executable, "-m", "grc_jax.cli", "train", "--config", "configs/tiny.yaml"]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(overrides: list[str], processes: int) -> None:
    if processes == 1:
        commands = [COMMAND + overrides]
    else:
        join = ["--coordinator", f"127.0.0.1:{_port()}", "--num-processes", str(processes)]
        commands = [[*COMMAND, *join, "--process-id", str(i), *overrides] for i in range(processes)]
    procs = [
        subprocess.Popen(c, cwd=ROOT, env=_env(8 // processes), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for c in commands
    ]  # fmt: skip
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            sys.exit(f"grc train failed ({p.returncode}):\n{err[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--last", type=int, default=10, help="steps averaged at the end")
    ap.add_argument("--one-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--two-seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    data = args.out / "synth"
    synthesize(data, seed=0, queries_per_doc=1)
    base = [
        *TINY_MODEL, "train.log_every=1", "train.eval_every=1000", "train.warmup_steps=2",
        f"train.steps={args.steps}", "train.checkpoint_every=1000",
        f"data.train_path={data}/train.jsonl", f"data.eval_path={data}/validation.jsonl",
        f"train.output_dir={args.out}",
    ]  # fmt: skip
    runs = [(1, s) for s in args.one_seeds] + [(2, s) for s in args.two_seeds]
    means = {}
    for processes, seed in runs:
        name = f"p{processes}_seed{seed}"
        _train([*base, f"train.run_name={name}", f"data.shuffle_seed={seed}"], processes)
        rows = [json.loads(line) for line in (args.out / name / "metrics.jsonl").open()]
        losses = {r["step"]: r["loss/total"] for r in rows}
        last = range(args.steps - args.last + 1, args.steps + 1)
        means[(processes, seed)] = sum(losses[s] for s in last) / args.last
    reference = means[runs[0]]
    first = f"{runs[0][0]} process(es), seed {runs[0][1]}"
    print(f"| run | mean loss, last {args.last} of {args.steps} steps | vs {first} |")
    print("| --- | --- | --- |")
    for (processes, seed), mean in means.items():
        devices = 8 // processes
        diff = f"{(mean - reference) / reference:+.2%}"
        print(f"| {processes} process(es) x {devices} devices, seed {seed} | {mean:.3f} | {diff} |")


if __name__ == "__main__":
    main()
