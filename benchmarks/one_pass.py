"""One GRC step (three losses from one pass) against three separate single-loss passes.

DESIGN.md section 4: every GRC example feeds L_gen, L_rep and L_comp from the same forward pass.
This benchmark takes the same records and trains on them four ways, every batch packed by
`BatchBuilder` into the config's `[batch_size, seq_len]` and run through the real jitted train
step (forward, backward, AdamW):

- `grc`: one group per record (`make_group`: the query with reasoning, latents and reconstruction;
  positive and negatives as documents with reconstruction);
- `gen`: generation only, one block per record: TEXT bos+query, GEN reasoning+answer+eos;
- `rep`: embedding only, single compression blocks without reconstruction: the query (TEXT
  bos+query+reasoning+answer, LATENT x K) and each document (TEXT bos+doc, LATENT x K), with the
  same InfoNCE slot metadata as `make_group` (groups packed whole);
- `comp`: compression only: the query (without reasoning) and every document as compression
  block + reconstruction block, exactly `query_example` / `document_example`, slot kind 0 (no
  InfoNCE); examples packed one by one.

Variants are interleaved across repeats; the time of a variant is the median over repeats of the
sum over its batches. Analytic FLOPs are `3 * forward_flops` per batch (dense rows, padding
included). Each variant's last batch is part-filled, which weighs on a few records; the ratio of
non-padding tokens is also reported as the steady-state (endless stream) estimate. Run from the
repository root: `python -m benchmarks.one_pass`.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
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
from grc_jax.core.config import Config, load_config
from grc_jax.core.roles import DOC, QUERY
from grc_jax.core.sharding import make_mesh
from grc_jax.data.groups import Group, doc_hash, document_example, make_group, query_example
from grc_jax.data.layout import gen, latents, layout_example, text
from grc_jax.data.pipeline import BatchBuilder, slots_per_row
from grc_jax.data.schema import GRCRecord
from grc_jax.data.tokenizer import Tokenizer
from grc_jax.train.flops import forward_flops
from grc_jax.train.state import create_state
from grc_jax.train.step import batch_shardings, make_train_step

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("grc", "gen", "rep", "comp")
SEPARATE = ("gen", "rep", "comp")


def _reasoning_ids(tok: Tokenizer, record: GRCRecord) -> list[int]:
    # The same text as `query_example`'s GEN span: reasoning then "answer : ...".
    parts = [record.reasoning] if record.reasoning else []
    if record.answer:
        parts.append(f"answer : {record.answer}")
    return tok.encode(" ".join(parts)) if parts else []


def _single(example: dict[str, np.ndarray]) -> Group:
    """A group of one example that feeds no InfoNCE (slot kind 0)."""
    return Group(examples=[example], kinds=[0], positive=[0], docs=[0])


def grc_groups(tok: Tokenizer, records: list[GRCRecord], cfg: Config) -> list[Group]:
    k, mode = cfg.grc.num_latents, cfg.grc.memory_mode
    return [make_group(tok, r, k, mode, with_reasoning=True) for r in records]


def generation_groups(tok: Tokenizer, records: list[GRCRecord], cfg: Config) -> list[Group]:
    k, mode = cfg.grc.num_latents, cfg.grc.memory_mode
    groups = []
    for r in records:
        block = [text([tok.bos_id, *tok.encode(r.query)])]
        target = _reasoning_ids(tok, r)
        block.append(gen([*target, tok.eos_id]))
        groups.append(_single(layout_example([block], k, mode)))
    return groups


def embedding_groups(tok: Tokenizer, records: list[GRCRecord], cfg: Config) -> list[Group]:
    k, mode = cfg.grc.num_latents, cfg.grc.memory_mode
    groups = []
    for r in records:
        query = [text([tok.bos_id, *tok.encode(r.query), *_reasoning_ids(tok, r)]), latents(k)]
        docs = [r.positive, *r.negatives]
        examples = [[query]] + [[[text([tok.bos_id, *tok.encode(d)]), latents(k)]] for d in docs]
        groups.append(
            Group(
                examples=[layout_example(e, k, mode) for e in examples],
                kinds=[QUERY] + [DOC] * len(docs),
                positive=[0, 1] + [0] * len(r.negatives),
                docs=[doc_hash(r.positive)] * 2 + [doc_hash(n) for n in r.negatives],
            )
        )
    return groups


def compression_groups(tok: Tokenizer, records: list[GRCRecord], cfg: Config) -> list[Group]:
    k, mode = cfg.grc.num_latents, cfg.grc.memory_mode
    groups = []
    for r in records:
        examples = [query_example(tok, r, k, with_reasoning=False)]
        examples.append(document_example(tok, r.positive, r.compress_target, k))
        examples += [document_example(tok, n, None, k) for n in r.negatives]
        groups += [_single(layout_example(e, k, mode)) for e in examples]
    return groups


def pack(groups: list[Group], cfg: Config) -> list[dict[str, np.ndarray]]:
    """Pack groups in order into `[batch_size, seq_len]` batches (a new batch when one is full)."""
    builder = BatchBuilder(cfg.data.batch_size, cfg.data.seq_len, slots_per_row(cfg), 1, 0)
    batches = []
    for g in groups:
        if builder.try_add(g):
            continue
        if builder.groups:
            batches.append(builder.finish())
        if not builder.try_add(g):
            n = sum(len(e["tokens"]) for e in g.examples)
            raise ValueError(
                f"a group of {len(g.examples)} examples ({n} tokens) does not fit in one batch of "
                f"{cfg.data.batch_size} x {cfg.data.seq_len}"
            )
    if builder.groups:
        batches.append(builder.finish())
    return batches


def variant_batches(tok: Tokenizer, records: list[GRCRecord], cfg: Config) -> dict[str, list]:
    batches = {
        "grc": pack(grc_groups(tok, records, cfg), cfg),
        "gen": pack(generation_groups(tok, records, cfg), cfg),
        "rep": pack(embedding_groups(tok, records, cfg), cfg),
        "comp": pack(compression_groups(tok, records, cfg), cfg),
    }
    return batches


class Runner:
    """Threads one train state through the jitted step over a list of device batches."""

    def __init__(self, step_fn, state):
        self.step_fn, self.state = step_fn, state

    def run(self, batches: list[dict[str, jax.Array]]) -> list[dict[str, jax.Array]]:
        state, out = self.state, []
        for batch in batches:
            state, metrics = self.step_fn(state, batch)
            out.append(metrics)
        jax.block_until_ready((state, out))
        self.state = state
        return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    p.add_argument("--records", type=int, default=128, help="first N synthetic train records")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats (after one warm-up)")
    p.add_argument("--seed", type=int, default=0, help="synthetic corpus seed")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    p.add_argument("--out", default=str(RESULTS_DIR / "one_pass.json"))
    p.add_argument("--quick", action="store_true", help="tiny shapes, 8 records, 1 repeat (smoke)")
    args = p.parse_args(argv)
    if args.quick:
        args.records, args.repeats = min(args.records, 8), 1
        args.set = QUICK_OVERRIDES + args.set
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = machine(command_line("benchmarks.one_pass", argv))
    cfg = load_config(args.config, args.set)
    with tempfile.TemporaryDirectory() as tmp:
        records = load_records(args.records, args.seed, Path(tmp))
        tok = build_tokenizer(records, Path(tmp), cfg.model.vocab_size)
    host = variant_batches(tok, records, cfg)

    mesh = make_mesh(cfg.mesh)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host["grc"][0])
    bsh = batch_shardings(shapes, mesh)
    state, shardings = create_state(cfg, mesh, jax.random.key(cfg.train.seed))
    runner = Runner(make_train_step(cfg, mesh, shardings, bsh), state)
    device = {name: [jax.device_put(b, bsh) for b in bs] for name, bs in host.items()}

    # Warm-up (compiles once: every batch has the same shape) and the loss counts per variant.
    counts = {}
    for name in VARIANTS:
        metrics = jax.device_get(runner.run(device[name]))
        counts[name] = {
            key: float(sum(m[f"count/{key}"] for m in metrics))
            for key in ("gen_tokens", "comp_tokens", "queries")
        }
        counts[name]["finite"] = all(math.isfinite(float(m["loss/total"])) for m in metrics)
    times = interleaved_times(
        {name: (lambda n=name: runner.run(device[n])) for name in VARIANTS}, args.repeats, warmup=0
    )

    flops_per_batch = 3 * forward_flops(cfg, cfg.data.batch_size)
    variants = {}
    for name in VARIANTS:
        bs = host[name]
        tokens = int(sum(np.sum(b.segment_ids != 0) for b in bs))
        variants[name] = {
            "batches": len(bs),
            "tokens": tokens,
            "fill": tokens / (len(bs) * cfg.data.batch_size * cfg.data.seq_len),
            "last_batch_fill": float(np.mean(bs[-1].segment_ids != 0)),
            "time_s": median(times[name]),
            "time_per_batch_s": median(times[name]) / len(bs),
            "times_s": times[name],
            "train_flops": flops_per_batch * len(bs),
            "loss_counts": counts[name],
        }
    sep_time = sum(variants[n]["time_s"] for n in SEPARATE)
    sep_flops = sum(variants[n]["train_flops"] for n in SEPARATE)
    per_repeat = [sum(times[n][r] for n in SEPARATE) / times["grc"][r] for r in range(args.repeats)]
    result = {
        "benchmark": "one_pass",
        "machine": finish_machine(info),
        "config": args.config,
        "overrides": args.set,
        "records": args.records,
        "repeats": args.repeats,
        "batch_shape": [cfg.data.batch_size, cfg.data.seq_len],
        "num_latents": cfg.grc.num_latents,
        "variants": variants,
        "separate": {
            "batches": sum(variants[n]["batches"] for n in SEPARATE),
            "tokens": sum(variants[n]["tokens"] for n in SEPARATE),
            "time_s": sep_time,
            "train_flops": sep_flops,
        },
        "ratio_time": sep_time / variants["grc"]["time_s"],
        "ratio_time_per_repeat_median": median(per_repeat),
        "ratio_flops": sep_flops / variants["grc"]["train_flops"],
        # With an endless stream (no part-filled last batch) every variant packs about as densely,
        # so the ratio of non-padding tokens is the steady-state ratio of batches and FLOPs.
        "ratio_tokens": sum(variants[n]["tokens"] for n in SEPARATE) / variants["grc"]["tokens"],
    }
    write_json(args.out, result)
    print_report(result)
    return result


def print_report(result: dict[str, Any]) -> None:
    rows = []
    v = result["variants"]
    labels = {"grc": "GRC (one pass)", "gen": "(a) gen only", "rep": "(b) embed only",
              "comp": "(c) compress only"}  # fmt: skip
    for name in VARIANTS:
        x = v[name]
        c = x["loss_counts"]
        rows.append([
            labels[name], x["batches"], x["tokens"], f"{x['fill']:.2f}",
            f"{x['last_batch_fill']:.2f}", x["time_s"], x["time_per_batch_s"],
            x["train_flops"] / 1e9, int(c["gen_tokens"]), int(c["queries"]), int(c["comp_tokens"]),
        ])  # fmt: skip
    s = result["separate"]
    rows.append(["(a)+(b)+(c)", s["batches"], s["tokens"], "", "", s["time_s"], "",
                 s["train_flops"] / 1e9, "", "", ""])  # fmt: skip
    headers = ["variant", "batches", "tokens", "fill", "last fill", "time (s)", "s/batch",
               "train GFLOP",
               "L_gen targets", "L_rep queries", "L_comp targets"]  # fmt: skip
    b, t = result["batch_shape"]
    print(describe(result["machine"]))
    print(
        f"{result['records']} records, batches of {b} x {t}, median of {result['repeats']} repeats"
    )
    print(format_table(headers, rows))
    print(
        f"(a+b+c)/GRC: time {result['ratio_time']:.2f}x (per-repeat median "
        f"{result['ratio_time_per_repeat_median']:.2f}x), FLOPs {result['ratio_flops']:.2f}x, "
        f"non-padding tokens {result['ratio_tokens']:.2f}x"
    )


if __name__ == "__main__":
    main()
