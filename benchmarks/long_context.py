"""Long-context training: train-step memory and time against `seq_len`, dense vs flash attention.

For each `seq_len` and each attention implementation (`model.attention_impl`: `dense` builds the
`[t, t]` mask and float32 scores; `chunked` is GRC flash attention in pure JAX; `kernel` is the
Pallas TPU kernel, measured only on a TPU) the real train step (`make_train_step`, SmolLM2-135M
shapes, batch 1) is compiled and XLA's memory analysis gives its temporary and total bytes. Step
time is measured for the lengths in `--time-seq-lens`, the implementations interleaved in one run
(`benchmarks.common.interleaved_times`), median of `--steps` steps.

The batch is one real GRC group built by the data pipeline (`make_group`, `BatchBuilder`) around
a long document that fills about half the row (the group holds the document in its compression
block and again as the reconstruction target of its consumer block), plus its query: the long
context case, where causality is the only sparsity. `--layout packed` packs many short synthetic
groups instead (packed pre-training rows: most tiles pair different examples and are skipped).

Run from the repository root: `python -m benchmarks.long_context` (on this 2-core CPU
each SmolLM2 compile takes about half a minute and a timed step minutes at 2048 tokens);
`--quick` for a smoke run.
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
from benchmarks.train_throughput import grc_batch
from grc_jax.core.batch import Batch
from grc_jax.core.config import Config, load_config
from grc_jax.core.sharding import activation_sharding, make_mesh
from grc_jax.data.groups import make_group
from grc_jax.data.pipeline import BatchBuilder, loss_targets, slots_per_row
from grc_jax.data.schema import GRCRecord
from grc_jax.data.tokenizer import Tokenizer
from grc_jax.train.state import create_state
from grc_jax.train.step import batch_shardings, make_train_step

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def config(seq_len: int, impl: str, args: argparse.Namespace) -> Config:
    overrides = [
        f"data.seq_len={seq_len}", "data.batch_size=1", "mesh.data=1",
        f"model.attention_impl={impl}", f"model.attention_chunk={args.chunk}",
        f"model.max_position_embeddings={max(8192, 2 * seq_len)}", f"model.dtype={args.dtype}",
        f"model.remat_policy={args.remat}", "train.logits_at=targets",
    ]  # fmt: skip
    if args.quick:
        overrides += [
            "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
            "model.head_dim=16", "model.d_ff=128", "model.vocab_size=1024",
        ]  # fmt: skip
    return load_config(ROOT / "configs" / "smollm2_135m.yaml", overrides)


def long_document_batch(cfg: Config, tok: Tokenizer, records: list[GRCRecord]) -> Batch:
    """One row: the group of a record whose document (synthetic documents joined) is as long as
    fits, the rest of the row padding."""
    k, mode = cfg.grc.num_latents, cfg.grc.memory_mode
    sentences = [r.positive for r in records]
    per = max(1, np.mean([len(tok.encode(s)) for s in sentences[:50]]))
    n = int(cfg.data.seq_len / 2 / per)
    while n > 0:
        doc = " ".join(sentences[i % len(sentences)] for i in range(n))
        record = GRCRecord(query=records[0].query, positive=doc)
        builder = BatchBuilder(1, cfg.data.seq_len, slots_per_row(cfg), 1, 0)
        if builder.try_add(make_group(tok, record, k, mode, with_reasoning=False)):
            batch = builder.finish()
            return batch.replace(**loss_targets(batch))
        n = int(n * 0.95)
    raise ValueError(f"no long-document group fits a row of {cfg.data.seq_len} tokens")


class Step:
    """One (seq_len, impl) train step: compiled once, its memory analysis, and a timed call."""

    def __init__(self, cfg: Config, batch: Batch, mesh, compile_only: bool):
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
        bsh = batch_shardings(shapes, mesh)
        state, shardings = create_state(cfg, mesh, jax.random.key(0))
        fn = make_train_step(cfg, mesh, shardings, bsh)
        t0 = time.perf_counter()
        with activation_sharding(mesh):  # as `make_train_step`'s wrapper calls it
            compiled = fn.jitted.lower(state, jax.device_put(batch, bsh)).compile()
        # The timed calls run this executable: the step is compiled once, not again by jit.
        self.compiled = compiled
        self.compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        self.temp_bytes = mem.temp_size_in_bytes
        self.total_bytes = (
            mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes
        )  # fmt: skip
        self.state, self.batch = (
            (None, None) if compile_only else (state, jax.device_put(batch, bsh))
        )
        self.loss = float("nan")

    def __call__(self) -> None:
        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        self.loss = float(metrics["loss/total"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--seq-lens",
        default="1024,2048,4096,8192,16384,32768",
        help="lengths whose train step is compiled (memory analysis)",
    )
    p.add_argument("--time-seq-lens", default="2048,8192", help="lengths also timed")
    p.add_argument("--impls", default="dense,chunked", help="model.attention_impl values")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after the warm-up steps)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (the step is "
                   "compiled ahead of time either way)")  # fmt: skip
    p.add_argument("--chunk", type=int, default=512, help="model.attention_chunk")
    p.add_argument("--dtype", default="float32", help="model.dtype (bf16 matmuls are slow on CPU)")
    p.add_argument("--remat", default="full", help="model.remat_policy")
    p.add_argument("--layout", choices=("long", "packed"), default="long")
    p.add_argument("--records", type=int, default=400, help="synthetic records to draw text from")
    p.add_argument("--out", default=str(RESULTS_DIR / "long_context.json"))
    p.add_argument("--quick", action="store_true", help="a 2-layer model, short rows (smoke)")
    args = p.parse_args(argv)
    if args.quick:
        args.seq_lens, args.time_seq_lens, args.steps, args.chunk = "128,256", "256", 1, 64
        args.records = min(args.records, 64)
    return args


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = machine(command_line("benchmarks.long_context", argv))
    seq_lens, timed = _ints(args.seq_lens), set(_ints(args.time_seq_lens))
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        records = load_records(args.records, 0, Path(tmp))
        tok = build_tokenizer(records, Path(tmp), 1024)
    t0 = time.perf_counter()
    results = []
    for t in sorted(set(seq_lens) | timed):
        steps = {}
        for impl in impls:
            cfg = config(t, impl, args)
            mesh = make_mesh(cfg.mesh, jax.devices()[:1])
            if args.layout == "long":
                batch = long_document_batch(cfg, tok, records)
            else:
                batch = grc_batch(cfg, tok, records, np.random.default_rng(0))
            try:
                steps[impl] = Step(cfg, batch, mesh, compile_only=t not in timed)
            except Exception as e:  # e.g. out of memory while compiling: a result, not a crash
                print(
                    f"seq_len {t} {impl}: does not compile ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]})",
                    flush=True,
                )
                steps[impl] = None
        times = {}
        if t in timed:
            runnable = {i: s for i, s in steps.items() if s is not None}
            times = interleaved_times(runnable, args.steps, warmup=args.warmup)
        for impl, s in steps.items():
            r = {"seq_len": t, "impl": impl, "compiles": s is not None}
            if s is not None:
                r |= {
                    "temp_bytes": s.temp_bytes,
                    "total_bytes": s.total_bytes,
                    "compile_s": s.compile_s,
                }
                if impl in times:
                    r |= {
                        "step_s": median(times[impl]),
                        "step_times_s": times[impl],
                        "loss": s.loss,
                    }
            results.append(r)
            print(r, flush=True)
        del steps
    result = {
        "benchmark": "long_context",
        "machine": finish_machine(info),
        "layout": args.layout, "dtype": args.dtype, "remat": args.remat, "chunk": args.chunk,
        "wall_s": time.perf_counter() - t0,
        "results": results,
    }  # fmt: skip
    write_json(args.out, result)
    print_report(result)
    return result


def print_report(result: dict[str, Any]) -> None:
    by = {(r["seq_len"], r["impl"]): r for r in result["results"]}
    impls = list(dict.fromkeys(r["impl"] for r in result["results"]))
    lens = sorted({r["seq_len"] for r in result["results"]})
    rows = []
    for t in lens:
        row = [t]
        for impl in impls:
            r = by.get((t, impl), {})
            row.append(f"{r['temp_bytes'] / GIB:.3f}" if r.get("compiles") else "no compile")
        for impl in impls:
            prev = by.get((t // 2, impl), {})
            r = by.get((t, impl), {})
            grow = (
                (r["temp_bytes"] / prev["temp_bytes"])
                if r.get("compiles") and prev.get("compiles")
                else None
            )
            row.append(f"{grow:.2f}x" if grow else "")
        for impl in impls:
            r = by.get((t, impl), {})
            row.append(f"{r['step_s']:.2f}" if "step_s" in r else "")
        rows.append(row)
    headers = (
        ["seq_len"]
        + [f"{i} temp GiB" for i in impls]
        + [f"{i} temp vs T/2" for i in impls]
        + [f"{i} step s" for i in impls]
    )
    print(describe(result["machine"]))
    print(
        f"layout {result['layout']}, {result['dtype']}, remat {result['remat']}, "
        f"chunk {result['chunk']}, batch 1, SmolLM2-135M shapes"
    )
    print(format_table(headers, rows))


if __name__ == "__main__":
    main()
