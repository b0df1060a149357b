"""Replay the probes of issue 11 against the `grc` CLI and print what each one does now.

Each probe is a real command (a `python -m grc_jax.cli ...` subprocess) on a tiny model trained
here, after whatever damage the probe needs (a copied run, flipped bytes, a bad data file, ...).
The table printed (markdown) gives the probe, the exit code and the first error line, or what
correct behaviour was checked; `docs/reliability.md` records it. Run from the repository root:

    .venv/bin/python scripts/reliability_probes.py --out /tmp/probes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
    "model.head_dim=16", "model.d_ff=64", "model.vocab_size=512", "grc.num_latents=4",
    "data.seq_len=128", "data.batch_size=8", "train.eval_queries=2", "train.warmup_steps=2",
    "train.log_every=1", "train.eval_every=1000", "train.checkpoint_every=2", "train.steps=6",
]  # fmt: skip


class Probes:
    def __init__(self, out: Path):
        self.out, self.rows = out, []
        self.data = out / "synth"

    def grc(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "grc_jax.cli", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip

    def train_args(self, name: str, *extra: str, data: Path | None = None) -> list[str]:
        d = data or self.data
        return [
            "train", "--config", "configs/tiny.yaml", *TINY, f"data.train_path={d}/train.jsonl",
            f"data.eval_path={self.data}/validation.jsonl", f"train.output_dir={self.out / 'runs'}",
            f"train.run_name={name}", *extra,
        ]  # fmt: skip

    def record(self, probe: str, r: subprocess.CompletedProcess, outcome: str = "") -> None:
        errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
        line = errors[0] if errors else outcome
        tb = "Traceback" in r.stderr
        self.rows.append({"probe": probe, "rc": r.returncode, "traceback": tb, "outcome": line})
        print(json.dumps(self.rows[-1]), flush=True)

    def run(self) -> None:
        from grc_jax.data.synth import synthesize

        synthesize(self.data, seed=0, queries_per_doc=1)
        runs = self.out / "runs"
        base = runs / "base"
        r = self.grc(*self.train_args("base"))
        assert r.returncode == 0, r.stderr[-2000:]

        # 1. a refused resume leaves config.yaml; inference then loads the real model
        shutil.copytree(base, runs / "r1")
        before = (runs / "r1" / "config.yaml").read_text()
        r = self.grc(*self.train_args("r1", "model.n_layers=2", "train.steps=8"))
        same = (runs / "r1" / "config.yaml").read_text() == before
        self.record("resume with model.n_layers=2 over a 1-layer run", r)
        g = self.grc("generate", str(runs / "r1"), "--prompt", "hello", "--max-new-tokens", "2")
        self.record("then `grc generate` on that run", g,
                    f"config.yaml unchanged: {same}; generate rc {g.returncode}")  # fmt: skip

        # 2. two processes on one run
        first = subprocess.Popen(
            [sys.executable, "-m", "grc_jax.cli", *self.train_args("busy", "train.steps=400")],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        lock = runs / "busy" / ".lock"
        t0 = time.monotonic()
        while not (lock.exists() and lock.read_text().strip()) and time.monotonic() - t0 < 120:
            time.sleep(0.2)
        r = self.grc(*self.train_args("busy", "train.seed=1", "train.steps=400"))
        self.record("second `grc train` on a run in use", r)
        first.send_signal(signal.SIGKILL)
        first.wait()

        # 3. corruption
        for how in ("flip", "truncate", "data_state"):
            name = f"corrupt_{how}"
            shutil.copytree(base, runs / name)
            step = max(int(p.name) for p in (runs / name / "checkpoints").iterdir()
                       if p.name.isdigit())  # fmt: skip
            step_dir = runs / name / "checkpoints" / str(step)
            if how == "data_state":
                files = [p for p in (step_dir / "data").rglob("*") if p.is_file()]
                files[0].write_text('{"broken": ')
            else:
                files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
                f = max(files, key=lambda p: p.stat().st_size)
                b = bytearray(f.read_bytes())
                if how == "flip":
                    for i in range(len(b) // 2, min(len(b) // 2 + 4096, len(b))):
                        b[i] ^= 0xFF
                else:
                    b = b[: len(b) // 2]
                f.write_bytes(bytes(b))
            r = self.grc(*self.train_args(name, "train.steps=8"))
            self.record(f"resume over a checkpoint with {how.replace('_', ' ')}", r)
            g = self.grc("generate", str(runs / name), "--prompt", "hi", "--max-new-tokens", "2")
            self.record(f"`grc generate` on that run ({how.replace('_', ' ')})", g)
            older = step - 2
            r = self.grc(*self.train_args(name, "train.steps=8", f"train.resume_step={older}"))
            self.record(f"then `train.resume_step={older}`", r,
                        f"resumed from step {older}: rc {r.returncode}")  # fmt: skip

        # 4. data
        bad = self.out / "bad"
        bad.mkdir()
        good_lines = (self.data / "train.jsonl").read_text().splitlines()
        mixed = bad / "mixed"
        mixed.mkdir()
        # 30 good records: the 12 steps read every line at least once.
        (mixed / "train.jsonl").write_text("\n".join(["not json", *good_lines[:30], "{]"]) + "\n")
        r = self.grc(*self.train_args("skip", "data.skip_bad_lines=true", "train.steps=12",
                                      data=mixed))  # fmt: skip
        rows = (runs / "skip" / "metrics.jsonl").read_text().splitlines()
        shown = json.loads(rows[-1]).get("data/bad_lines_skipped")
        self.record("fresh run, 2 bad lines, data.skip_bad_lines=true", r,
                    f"rc {r.returncode}; metrics.jsonl data/bad_lines_skipped={shown}")  # fmt: skip
        allbad = bad / "allbad"
        allbad.mkdir()
        (allbad / "train.jsonl").write_text("nope\n{]\n")
        r = self.grc(*self.train_args("allbad", "data.skip_bad_lines=true", data=allbad),
                     timeout=300)  # fmt: skip
        self.record("every line bad, skipping on (hung before)", r)
        empty = bad / "empty"
        empty.mkdir()
        (empty / "train.jsonl").write_text("")
        r = self.grc(*self.train_args("empty", data=empty))
        self.record("empty training file", r)
        big = bad / "big"
        big.mkdir()
        rec = json.loads(good_lines[0])
        rec["positive"] = " ".join(["word"] * 30000)
        (big / "train.jsonl").write_text("\n".join([*good_lines[:20], json.dumps(rec)]) + "\n")
        r = self.grc(*self.train_args("big", data=big))
        self.record("a 30k-token record, no skipping", r)
        r = self.grc(*self.train_args("bigskip", "data.skip_bad_lines=true", data=big))
        self.record("the same with data.skip_bad_lines=true", r,
                    f"rc {r.returncode} (skipped and counted)")  # fmt: skip

        # 5. config values
        for override in ("train.min_lr_ratio=-5", "train.grad_clip=-1", "train.weight_decay=-1",
                         "model.init_std=-1", "model.max_position_embeddings=-5",
                         "train.run_name=../../escape", "model.vocab_size=16"):  # fmt: skip
            r = self.grc(*self.train_args("cfg", override))
            self.record(f"`{override}`", r)
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
        r = subprocess.run([sys.executable, "-m", "grc_jax.cli",
                            *self.train_args("dp", "data.batch_size=3", "mesh.data=2")],
                           cwd=ROOT, capture_output=True, text=True, env=env)  # fmt: skip
        self.record("`data.batch_size=3 mesh.data=2` on 2 devices", r)

        # 6. smaller
        long_text = " ".join(["word"] * 12001)
        r = self.grc("embed", str(base), "--text", long_text)
        self.record("`grc embed` of a 12,001-word text", r)
        r = self.grc("compress", str(base), "--text", long_text, "--out", str(bad / "m.st"))
        self.record("`grc compress` of a 12,001-word text", r)
        index = self.out / "index"
        docs = bad / "docs.txt"
        docs.write_text("alpha beta\ngamma delta\nepsilon zeta\n")
        r = self.grc("index", str(base), "--corpus", str(docs), "--out", str(index))
        assert r.returncode == 0, r.stderr
        for what in ("truncated memories", "no texts", "nan embeddings", "pickled embeddings"):
            broken = self.out / f"index_{what.replace(' ', '_')}"
            shutil.copytree(index, broken)
            if what == "truncated memories":
                f = broken / "memories.safetensors"
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
            elif what == "no texts":
                meta = json.loads((broken / "index.json").read_text())
                del meta["texts"]
                (broken / "index.json").write_text(json.dumps(meta))
            elif what == "nan embeddings":
                emb = np.load(broken / "embeddings.npy")
                emb[1] = np.nan
                np.save(broken / "embeddings.npy", emb)
            else:
                emb = np.load(broken / "embeddings.npy")
                np.save(broken / "embeddings.npy", np.array(list(emb), dtype=object),
                        allow_pickle=True)  # fmt: skip
            r = self.grc("rag", str(base), "--index", str(broken), "--question", "alpha", "-k", "1")
            self.record(f"`grc rag` over an index with {what}", r)
        hf = bad / "hf"
        hf.mkdir()
        (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (hf / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"lm_head.weight": "../other/model.safetensors"}})
        )
        r = self.grc("import-hf", str(hf), str(bad / "imported"))
        self.record("import-hf with weight_map entry `../other/model.safetensors`", r)
        r = self.grc(*self.train_args("later", "train.steps=4")[:3], "--stop-after", "2",
                     *self.train_args("later", "train.steps=4")[3:])  # fmt: skip
        self.record("overrides placed after `--stop-after 2`", r,
                    f"rc {r.returncode}; stopped at a checkpoint: "
                    f"{(runs / 'later' / 'checkpoints' / '2').is_dir()}")  # fmt: skip
        # metrics after a crash, and SIGTERM: covered by scripts/fault_campaign.py and
        # tests/train/test_reliability.py (kills at random points, SIGTERM to a single process).

    def table(self) -> str:
        lines = ["| probe | exit code | traceback | outcome (first error line) |",
                 "| --- | --- | --- | --- |"]  # fmt: skip
        for row in self.rows:
            outcome = row["outcome"].replace("|", "\\|")
            if len(outcome) > 220:
                outcome = outcome[:217] + "..."
            lines.append(f"| {row['probe']} | {row['rc']} | {'yes' if row['traceback'] else 'no'} "
                         f"| {outcome} |")  # fmt: skip
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="/tmp/grc_probes")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    probes = Probes(out)
    probes.run()
    (out / "probes.json").write_text(json.dumps(probes.rows, indent=2))
    print()
    print(probes.table())
    return 0 if not any(r["traceback"] for r in probes.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
