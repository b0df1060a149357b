"""Train-step throughput: tokens/s and achieved FLOP/s against the measured matmul FLOP/s.

For each config (random weights) one batch with a real GRC layout is packed by `BatchBuilder` from
synthetic records (`make_group`); its TEXT/GEN token ids are then replaced by random ids in the
config's vocabulary (the cost does not depend on the ids). Every timed round runs one train step
per config and one `measure_matmul_flops` on the same devices, in rotated order; figures are
medians over rounds. Achieved FLOP/s = `train_flops_per_step` (3x forward, padding included,
remat not counted) / step time; "of matmul" divides it by the matmul FLOP/s.

CPU settings (`CPU_OVERRIDES`): SmolLM2-135M runs in float32 (bf16 matmuls are slow on CPU) with a
2 x 512 batch, keeping its `scan_layers` and `remat_policy`. Run from the repository root:
`python -m benchmarks.train_throughput`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from benchmarks.common import (
    QUICK_OVERRIDES,
    RESULTS_DIR,
    build_tokenizer,
    command_line,
    describe,
    finish_machine,
    format_table,
    interleaved_times,
    load_records,
    machine,
    median,
    write_json,
)
from grc_jax.core.batch import Batch
from grc_jax.core.config import Config, load_config
from grc_jax.core.roles import GEN, TEXT
from grc_jax.core.sharding import make_mesh
from grc_jax.data.groups import make_group
from grc_jax.data.pipeline import BatchBuilder, loss_targets, slots_per_row
from grc_jax.data.tokenizer import Tokenizer
from grc_jax.train.flops import measure_matmul_flops, train_flops_per_step
from grc_jax.train.state import create_state
from grc_jax.train.step import batch_shardings, make_train_step

ROOT = Path(__file__).resolve().parents[1]
N_SPECIAL = 4  # pad, unk, bos, eos keep their ids
CPU_OVERRIDES = {
    "tiny": [],
    "smollm2_135m": ["model.dtype=float32", "data.batch_size=2", "data.seq_len=512"],
}


def config_path(name: str) -> Path:
    """`tiny` -> configs/tiny.yaml; a path is used as given."""
    path = Path(name)
    return path if path.suffix in (".yaml", ".yml") else ROOT / "configs" / f"{name}.yaml"


def flops_of(cfg: Config) -> float:
    return train_flops_per_step(cfg, cfg.data.batch_size)


def grc_batch(cfg: Config, tok: Tokenizer, records: list, rng: np.random.Generator) -> Batch:
    """One `[batch_size, seq_len]` batch of whole GRC groups, TEXT/GEN ids made random."""
    builder = BatchBuilder(cfg.data.batch_size, cfg.data.seq_len, slots_per_row(cfg), 1, 0)
    k, mode = cfg.grc.num_latents, cfg.grc.memory_mode
    for r in records:
        if not builder.try_add(make_group(tok, r, k, mode, with_reasoning=True)):
            break
    if builder.groups == 0:
        raise ValueError(f"no GRC group fits in a {cfg.data.batch_size} x {cfg.data.seq_len} batch")
    batch = builder.finish()
    tokens, roles = batch.tokens, batch.roles
    regular = ((roles == TEXT) | (roles == GEN)) & (tokens >= N_SPECIAL)
    random_ids = rng.integers(N_SPECIAL, cfg.model.vocab_size, tokens.shape, dtype=np.int32)
    batch = batch.replace(tokens=np.where(regular, random_ids, tokens).astype(np.int32))
    return batch.replace(**loss_targets(batch))


class Bench:
    """One config's state, jitted step and device batch."""

    def __init__(self, name: str, cfg: Config, batch: Batch, mesh):
        self.name, self.cfg = name, cfg
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
        bsh = batch_shardings(shapes, mesh)
        self.state, shardings = create_state(cfg, mesh, jax.random.key(cfg.train.seed))
        self.step_fn = make_train_step(cfg, mesh, shardings, bsh)
        self.batch = jax.device_put(batch, bsh)
        self.tokens = int(np.sum(batch.segment_ids != 0))
        self.params = sum(x.size for x in jax.tree.leaves(self.state.params.model))
        self.loss = float("nan")

    def step(self) -> None:
        self.state, metrics = self.step_fn(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        self.loss = float(metrics["loss/total"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="tiny,smollm2_135m", help="comma-separated names or paths")
    p.add_argument("--steps", type=int, default=7, help="timed steps per config (after a warm-up)")
    p.add_argument("--records", type=int, default=400, help="synthetic records to pack from")
    p.add_argument("--out", default=str(RESULTS_DIR / "train_throughput.json"))
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 timed step (smoke)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.records = 1, min(args.records, 64)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = machine(command_line("benchmarks.train_throughput", argv))
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    cfgs = {}
    for name in names:
        overrides = list(CPU_OVERRIDES.get(Path(name).stem, []))
        if args.quick:
            overrides += QUICK_OVERRIDES
        cfgs[name] = (load_config(config_path(name), overrides), overrides)
    with tempfile.TemporaryDirectory() as tmp:
        records = load_records(args.records, 0, Path(tmp))
        tok = build_tokenizer(records, Path(tmp), 1024)

    rng = np.random.default_rng(0)
    mesh = make_mesh(next(iter(cfgs.values()))[0].mesh)
    benches = {
        name: Bench(name, cfg, grc_batch(cfg, tok, records, rng), mesh)
        for name, (cfg, _) in cfgs.items()
    }
    peaks: list[float] = []
    candidates = {name: b.step for name, b in benches.items()}
    candidates["matmul"] = lambda: peaks.append(measure_matmul_flops(mesh))
    t0 = time.perf_counter()
    times = interleaved_times(candidates, args.steps, warmup=1)
    peaks = peaks[1:]  # the warm-up round's measurement is dropped
    peak = median(peaks)
    # Load on a shared machine drifts: also compare each step with the matmul of its own round.
    per_round = {
        name: median(
            [flops_of(cfgs[name][0]) / t / p for t, p in zip(times[name], peaks, strict=True)]
        )
        for name in benches
    }

    results = {}
    for name, b in benches.items():
        cfg, overrides = cfgs[name]
        step_s = median(times[name])
        flops = flops_of(cfg)
        results[name] = {
            "overrides": overrides,
            "params": b.params,
            "batch_shape": [cfg.data.batch_size, cfg.data.seq_len],
            "dtype": cfg.model.dtype,
            "scan_layers": cfg.model.scan_layers,
            "remat_policy": cfg.model.remat_policy,
            "num_latents": cfg.grc.num_latents,
            "tokens_per_step": b.tokens,
            "step_time_s": step_s,
            "step_times_s": times[name],
            "tokens_per_s": b.tokens / step_s,
            "padded_tokens_per_s": cfg.data.batch_size * cfg.data.seq_len / step_s,
            "train_flops_per_step": flops,
            "achieved_flops_per_s": flops / step_s,
            "fraction_of_matmul": flops / step_s / peak,
            "fraction_of_matmul_per_round_median": per_round[name],
            "final_loss": b.loss,
        }
    result = {
        "benchmark": "train_throughput",
        "machine": finish_machine(info),
        "steps": args.steps,
        "matmul_flops_per_s": peak,
        "matmul_flops_per_s_samples": peaks,
        "matmul_flops_per_s_best": max(peaks),
        "matmul_shape": "[n_dev*1024, 1024] @ [1024, 1024] float32",
        "wall_s": time.perf_counter() - t0,
        "configs": results,
    }
    write_json(args.out, result)
    print_report(result)
    return result


def print_report(result: dict[str, Any]) -> None:
    rows = []
    for name, r in result["configs"].items():
        b, t = r["batch_shape"]
        rows.append([
            name, f"{r['params'] / 1e6:.1f}M", f"{b} x {t}", r["dtype"],
            "yes" if r["scan_layers"] else "no", r["remat_policy"], r["tokens_per_step"],
            r["step_time_s"], f"{r['tokens_per_s']:.0f}", r["achieved_flops_per_s"] / 1e9,
            f"{100 * r['fraction_of_matmul']:.1f}%",
            f"{100 * r['fraction_of_matmul_per_round_median']:.1f}%",
        ])  # fmt: skip
    headers = ["config", "params", "batch", "dtype", "scan", "remat", "tokens/step", "step (s)",
               "tokens/s", "GFLOP/s", "of matmul", "per round"]  # fmt: skip
    print(describe(result["machine"]))
    matmul = result["matmul_flops_per_s"] / 1e9
    n = len(result["matmul_flops_per_s_samples"])
    print(
        f"median of {result['steps']} steps; matmul {matmul:.1f} GFLOP/s "
        f"({result['matmul_shape']}, median of {n} rounds)"
    )
    print(format_table(headers, rows))


if __name__ == "__main__":
    main()
