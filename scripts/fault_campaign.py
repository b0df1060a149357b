"""Fault campaign: kill `grc train` at random points and corrupt checkpoints; every resume must be
bit-exact and every corruption must be caught.

Kills (`--kills N`, default 20): N runs of a tiny model, each started as a real `grc train`
subprocess, killed once with SIGKILL and then resumed (the same command again) to the end. The
kill lands at one of three kinds of point, in turn:

- `step`: after a random delay (between the first progress and a few steps on);
- `save`: the moment a checkpoint's temporary directory appears (Orbax is writing it);
- `commit`: the moment a new committed step directory appears (right after the rename).

After the resume completes, the final parameters must equal those of one uninterrupted run bit for
bit, and `metrics.jsonl` must hold each step once, with the uninterrupted run's losses.

Corruptions (`--corruptions`): a finished run's newest checkpoint gets bytes flipped in its largest
file, or a file truncated, or its integrity record removed; resuming must stop with exit code 2
and a one-line error naming the step, and `train.resume_step=<older>` must resume.

Usage (from the repository root; about a minute per 5 kills on 2 CPU cores):

    .venv/bin/python scripts/fault_campaign.py --kills 20 --out /tmp/faults
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
    "model.head_dim=16", "model.d_ff=64", "model.vocab_size=512", "grc.num_latents=4",
    "data.seq_len=128", "data.batch_size=8", "train.eval_queries=2", "train.warmup_steps=2",
    "train.log_every=1", "train.eval_every=1000", "train.checkpoint_every=2",
    "train.keep_checkpoints=3",
]  # fmt: skip
KINDS = ("step", "save", "commit")


def overrides(data: Path, out: Path, name: str, steps: int) -> list[str]:
    return [
        *TINY, f"train.steps={steps}", f"data.train_path={data}/train.jsonl",
        f"data.eval_path={data}/validation.jsonl", f"train.output_dir={out}",
        f"train.run_name={name}",
    ]  # fmt: skip


def grc_train(args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "grc_jax.cli", "train", "--config", "configs/tiny.yaml", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def params_digest(run: Path) -> str:
    """sha256 of the final parameters (every leaf, in order) as inference loads them."""
    import jax
    import numpy as np

    from grc_jax.checkpoints import load_model

    _, params, _ = load_model(run)
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Timings, and the records read so far (which depends on grain's read-ahead), are not
    # expected to repeat.
    skip = ("tokens_per_s", "step_time_s", "mfu", "data/records_read")
    return [{k: v for k, v in r.items() if k not in skip}
            for r in rows]  # fmt: skip


def committed_steps(run: Path) -> set[str]:
    d = run / "checkpoints"
    return {p.name for p in d.iterdir() if p.name.isdigit()} if d.is_dir() else set()


def saving(run: Path) -> bool:
    d = run / "checkpoints"
    return d.is_dir() and any("tmp" in p.name for p in d.iterdir())


def kill_once(args: list[str], run: Path, kind: str, rng: random.Random, budget_s: float):
    """Start a run and SIGKILL it at a point of `kind`; (killed, returncode, seconds)."""
    t0 = time.monotonic()
    proc = grc_train(args)
    before = committed_steps(run)
    delay = rng.uniform(0.05, 1.5)
    started = None
    while proc.poll() is None and time.monotonic() - t0 < budget_s:
        if started is None and (run / "metrics.jsonl").exists():
            started = time.monotonic()  # compiled and stepping
        hit = False
        if kind == "step":
            hit = started is not None and time.monotonic() - started >= delay
        elif kind == "save":
            hit = saving(run)
        elif kind == "commit":
            hit = bool(committed_steps(run) - before)
        if hit:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True, proc.returncode, time.monotonic() - t0
        time.sleep(0.005)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    return False, proc.returncode, time.monotonic() - t0


def run_kills(n: int, data: Path, out: Path, steps: int, seed: int) -> dict:
    """`n` runs, each killed once (kinds in turn) and then resumed to the end."""
    rng = random.Random(seed)
    ref = out / "reference"
    r = grc_train(overrides(data, out, "reference", steps))
    text = r.communicate()[0]
    if r.returncode != 0:
        raise SystemExit(f"reference run failed:\n{text}")
    want_params, want_metrics = params_digest(ref), metrics(ref)
    results = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        name = f"killed_{i}_{kind}"
        run = out / name
        args = overrides(data, out, name, steps)
        for attempt in range(3):  # a `step` kill can come too late for a short run: try again
            if attempt:
                shutil.rmtree(run, ignore_errors=True)
            killed, rc, t = kill_once(args, run, kind, rng, budget_s=180)
            if killed:
                break
        if not killed:
            raise SystemExit(f"{name}: the run ended (rc {rc}) before a `{kind}` point, 3 times")
        steps_before = sorted(int(s) for s in committed_steps(run))
        final = grc_train(args)
        text = final.communicate()[0]
        if final.returncode != 0:
            raise SystemExit(f"{name}: resume failed (rc {final.returncode}):\n{text}")
        got = metrics(run)
        seen = [row["step"] for row in got]
        row = {
            "run": name, "kill": kind, "killed_after_s": round(t, 2),
            "checkpoints_at_kill": steps_before,
            "bit_exact": params_digest(run) == want_params,
            "metrics_no_duplicates": len(seen) == len(set(seen)),
            "metrics_equal": got == want_metrics,
        }  # fmt: skip
        results.append(row)
        print(json.dumps(row), flush=True)
    return {"kills": n, "runs": results,
            "exact_resumes": sum(r["bit_exact"] for r in results),
            "all_ok": all(r["bit_exact"] and r["metrics_no_duplicates"] and r["metrics_equal"]
                          for r in results)}  # fmt: skip


def _largest_file(step_dir: Path) -> Path:
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.name != "grc_manifest.json"]
    return max(files, key=lambda p: p.stat().st_size)


def corrupt(step_dir: Path, how: str) -> str:
    if how == "flip":
        f = _largest_file(step_dir)
        data = bytearray(f.read_bytes())
        mid = len(data) // 2
        for i in range(mid, min(mid + 4096, len(data))):
            data[i] ^= 0xFF
        f.write_bytes(bytes(data))
        return f"flipped 4 KiB in {f.relative_to(step_dir)}"
    if how == "truncate":
        f = _largest_file(step_dir)
        with f.open("r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
        return f"truncated {f.relative_to(step_dir)}"
    if how == "manifest":
        (step_dir / "grc_manifest.json").unlink()
        return "removed grc_manifest.json"
    raise ValueError(how)


def run_corruptions(data: Path, out: Path, steps: int) -> list[dict]:
    results = []
    for how in ("flip", "truncate", "manifest"):
        name = f"corrupt_{how}"
        run = out / name
        args = overrides(data, out, name, steps)
        first = grc_train(args)
        first.wait()
        steps_dirs = sorted(committed_steps(run), key=int)
        newest = run / "checkpoints" / steps_dirs[-1]
        what = corrupt(newest, how)
        again = grc_train([*args, f"train.steps={steps + 2}"])
        text = again.communicate()[0]
        lines = [line for line in text.splitlines() if "error" in line]
        detected = again.returncode == 2 and any(steps_dirs[-1] in line for line in lines)
        older = steps_dirs[-2]
        fallback = grc_train([*args, f"train.steps={steps + 2}", f"train.resume_step={older}"])
        fb_text = fallback.communicate()[0]
        results.append({"corruption": what, "step": steps_dirs[-1], "rc": again.returncode,
                        "detected": detected, "message": lines[-1] if lines else text[-300:],
                        "resume_step_rc": fallback.returncode})  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
        if fallback.returncode != 0:
            print(fb_text[-2000:], flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps", type=int, default=24, help="steps of each run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/grc_fault_campaign")
    p.add_argument("--no-corruptions", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from grc_jax.data.synth import synthesize

    data = out / "synth"
    synthesize(data, seed=0, queries_per_doc=1)
    t0 = time.monotonic()
    report = {"kills": run_kills(args.kills, data, out, args.steps, args.seed)}
    if not args.no_corruptions:
        report["corruptions"] = run_corruptions(data, out, args.steps)
    report["wall_s"] = time.monotonic() - t0
    (out / "report.json").write_text(json.dumps(report, indent=2))
    k = report["kills"]
    print(f"\n{k['kills']} kills: {k['exact_resumes']} bit-exact resumes; "
          f"all checks passed: {k['all_ok']}")  # fmt: skip
    ok = k["all_ok"]
    for c in report.get("corruptions", []):
        print(f"corruption {c['corruption']} at step {c['step']}: detected {c['detected']} "
              f"(rc {c['rc']}), resume_step rc {c['resume_step_rc']}")  # fmt: skip
        ok = ok and c["detected"] and c["resume_step_rc"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
