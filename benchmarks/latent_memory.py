"""Decode over a whole document vs over its latent memory: ms/token and KV bytes read per token.

DESIGN.md sections 5-6: a consumer block over a document's K-token latent memory costs `K` KV
tokens whatever the document's length. For a document of `n` tokens this benchmark times one
jitted decode step (`paged_forward` with `C = 1`, the cache donated, as the engine runs it) of a
single request two ways:

- **(a) full**: the n document tokens and `--question` further text tokens (question + tokens
  generated so far) sit in the request's paged text cache; the new token attends to all of them;
- **(b) memory**: one K-token latent memory in the memory pool; the text cache holds only the
  `--question` tokens; the new token attends to the memory and them.

The caches are filled with random K/V (no prefill: only the decode step is timed) and weights are
random. The pure-JAX reference attention gathers every page of the block table, so each case gets
an engine sized for its own context: a block table of exactly the pages its text needs and a page
pool of those pages (+ the reserved page 0), i.e. (a) an engine sized for n-token documents,
(b) an engine sized for the question (`--pool-factor F`: a pool of F times the pages needed, the
rest unused). The step writes the new K/V into the donated cache in place, so its cost does not
depend on the pool size.

Every repeat runs each mode in turn (rotated order, `interleaved_times`): `--settle` untimed steps
(the first steps after the other mode pay for its cache and memory churn), then `--steps` timed
decode steps (writing the same text slot, so each step has the same shape and length); the figure
is the median over repeats of the time per step.

KV bytes = the K and V the step reads for the request: (text tokens + memory tokens) x layers x
kv heads x head_dim x 2 x itemsize. Run from the repository root:
`python -m benchmarks.latent_memory`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    QUICK_OVERRIDES,
    RESULTS_DIR,
    command_line,
    describe,
    finish_machine,
    format_table,
    interleaved_times,
    machine,
    median,
    write_json,
)
from grc_jax.core.config import Config, ModelConfig, load_config
from grc_jax.core.roles import TEXT
from grc_jax.infer.cache import PagePool, block_table
from grc_jax.infer.paged import StepInputs, paged_forward
from grc_jax.model import init_params

ROOT = Path(__file__).resolve().parents[1]
MODES = ("full", "memory")
# float32: bf16 matmuls are slow on CPU. Unscanned layers: decoding (`Transformer.decode`) runs
# layer by layer on per-layer params, as the engine does after unstacking a scanned checkpoint.
CPU_OVERRIDES = {
    "tiny": [],
    "smollm2_135m": ["model.dtype=float32", "model.scan_layers=false"],
}
QUICK_MODEL = [o for o in QUICK_OVERRIDES if o.startswith(("model.", "grc."))]


def config_path(name: str) -> Path:
    """`tiny` -> configs/tiny.yaml; a path is used as given."""
    path = Path(name)
    return path if path.suffix in (".yaml", ".yml") else ROOT / "configs" / f"{name}.yaml"


def kv_bytes_per_token(m: ModelConfig) -> int:
    """Bytes of K and V one cached token holds over all layers (float32 cache)."""
    return m.n_layers * m.n_kv_heads * m.head_dim * 2 * 4


class DecodeCase:
    """One request's decode step: a paged text cache of `text_tokens` (+ `memories` latent
    memories of K tokens), the engine sized for exactly that context."""

    def __init__(self, step, params, cfg: Config, text_tokens: int, memories: int,
                 page_size: int, seed: int, pool_factor: int = 1):  # fmt: skip
        m, k = cfg.model, cfg.grc.num_latents
        self.step, self.params = step, params
        self.text_tokens, self.memory_tokens = text_tokens, memories * k
        needed = -(-text_tokens // page_size)
        pool = PagePool(pool_factor * needed + 1, page_size)  # + the reserved page 0
        pages = pool.alloc(0, text_tokens)
        rng = np.random.default_rng(seed)
        pages = [int(p) for p in rng.permutation(pages)]  # not in order, as in a used pool
        width = len(pages)
        self.gathered_tokens = width * page_size + max(memories, 1) * k
        cache_shape = (m.n_layers, pool.n_pages, page_size, m.n_kv_heads, m.head_dim)
        # Slot 0 of the memory pool stays empty, as in the engine.
        mem_shape = (m.n_layers, memories + 1, k, m.n_kv_heads, m.head_dim)
        normal = lambda shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
        self.cache = {"k": normal(cache_shape), "v": normal(cache_shape)}
        self.memories = {"k": normal(mem_shape), "v": normal(mem_shape)}
        self.cache_bytes = 2 * int(np.prod(cache_shape)) * 4
        last = text_tokens - 1  # the new token's text slot; earlier slots hold the context
        mem_table = np.zeros((1, max(memories, 1)), np.int32)
        mem_table[0, :memories] = np.arange(1, memories + 1)
        self.inputs = jax.tree.map(
            jnp.asarray,
            StepInputs(
                tokens=np.full((1, 1), 7, np.int32),
                roles=np.full((1, 1), TEXT, np.int32),
                positions=np.full((1, 1), memories * k + last, np.int32),  # after the memories
                text_index=np.full((1, 1), last, np.int32),
                block_tables=block_table(pages, width)[None],
                text_lengths=np.full((1,), text_tokens, np.int32),  # this token included
                mem_tables=mem_table,
                mem_counts=np.full((1,), memories, np.int32),
            ),
        )
        self.logits = None
        self.samples: list[float] = []  # seconds per step, one per `timed` call

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.logits, self.cache = self.step(self.params, self.cache, self.memories, self.inputs)
        jax.block_until_ready((self.logits, self.cache))

    def timed(self, steps: int, settle: int) -> None:
        """`settle` untimed steps, then `steps` timed ones. The first steps after the other mode
        ran pay for its cache and memory churn (up to 5x on the small (b) step right after a large
        (a) step); a server decoding one kind of request runs such steps back to back."""
        self.run(settle)
        t0 = time.perf_counter()
        self.run(steps)
        self.samples.append((time.perf_counter() - t0) / steps)


def make_step(cfg: Config):
    """The jitted decode step; params are an argument (not closed over), the cache is donated."""
    def step(params, cache, memories, inputs):
        out, cache = paged_forward(params, cfg.model, cfg.grc, cache, memories, inputs)
        return out.logits, cache

    return jax.jit(step, donate_argnums=(1,))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="tiny,smollm2_135m", help="comma-separated names or paths")
    p.add_argument("--lengths", default="512,2048,8192,16384", help="document lengths n")
    p.add_argument("--question", type=int, default=64,
                   help="text tokens besides the document (question + generated), new token "
                        "included")  # fmt: skip
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--pool-factor", type=int, default=1,
                   help="page pool = this many times the pages the request needs (+ page 0); "
                        "the extra pages are unused")  # fmt: skip
    p.add_argument("--repeats", type=int, default=7, help="timed repeats (after a warm-up)")
    p.add_argument("--steps", type=int, default=3, help="timed decode steps per mode per repeat")
    p.add_argument("--settle", type=int, default=2,
                   help="untimed decode steps before each mode's timed steps")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every config (after the CPU settings)")  # fmt: skip
    p.add_argument("--out", default=str(RESULTS_DIR / "latent_memory.json"))
    p.add_argument("--quick", action="store_true", help="tiny shapes, short documents (smoke)")
    args = p.parse_args(argv)
    if args.quick:
        args.configs, args.lengths, args.repeats, args.steps, args.settle = "tiny", "256", 2, 1, 1
    args.config_names = [c.strip() for c in args.configs.split(",") if c.strip()]
    try:
        args.length_list = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        p.error(f"--lengths: expected comma-separated integers, got {args.lengths!r}")
    if not args.length_list or min(args.length_list) < 1:
        p.error(f"--lengths: expected positive document lengths, got {args.lengths!r}")
    if args.steps < 1 or args.repeats < 1 or args.settle < 0:
        p.error("--steps and --repeats: expected positive integers, --settle non-negative")
    if args.pool_factor < 1:
        p.error(f"--pool-factor: expected a positive integer, got {args.pool_factor}")
    if args.question < 1:
        p.error(f"--question: expected at least 1 token (the new one), got {args.question}")
    return args


def bench_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    overrides = list(CPU_OVERRIDES.get(Path(name).stem, [])) + (QUICK_MODEL if args.quick else [])
    overrides += args.set
    cfg = load_config(config_path(name), overrides)
    m, k = cfg.model, cfg.grc.num_latents
    params = jax.jit(lambda key: init_params(m, cfg.grc, key))(jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    step = make_step(cfg)
    per_token = kv_bytes_per_token(m)
    t0 = time.perf_counter()
    memory = DecodeCase(
        step, params, cfg, args.question, 1, args.page_size, seed=1, pool_factor=args.pool_factor
    )
    memory.run(1)  # compiles once: (b) has the same shapes for every n
    compile_s = {"memory": time.perf_counter() - t0}
    lengths = {}
    for n in args.length_list:
        t0 = time.perf_counter()
        full = DecodeCase(step, params, cfg, n + args.question, 0, args.page_size, seed=2,
                          pool_factor=args.pool_factor)  # fmt: skip
        full.run(1)
        compile_s[f"full_{n}"] = time.perf_counter() - t0
        cases = {"full": full, "memory": memory}
        memory.samples = []
        # interleaved_times orders the modes (rotated, after a warm-up round); each mode times
        # its own steady-state steps (`DecodeCase.timed`); the warm-up round's sample is dropped.
        interleaved_times(
            {mode: (lambda c=c: c.timed(args.steps, args.settle)) for mode, c in cases.items()},
            args.repeats,
            warmup=1,
        )
        times = {mode: c.samples[1:] for mode, c in cases.items()}
        modes = {}
        for mode, c in cases.items():
            per_step = times[mode]
            kv_tokens = c.text_tokens + c.memory_tokens
            modes[mode] = {
                "text_tokens": c.text_tokens,
                "memory_tokens": c.memory_tokens,
                "kv_tokens": kv_tokens,
                "kv_bytes": kv_tokens * per_token,
                "gathered_tokens": c.gathered_tokens,
                "cache_pool_bytes": c.cache_bytes,
                "ms_per_token": 1e3 * median(per_step),
                "step_times_s": per_step,
                "finite": bool(np.isfinite(np.asarray(c.logits)).all()),
            }
        lengths[str(n)] = {
            "modes": modes,
            "ratio_time": modes["full"]["ms_per_token"] / modes["memory"]["ms_per_token"],
            "ratio_time_per_repeat_median": median(
                [a / b for a, b in zip(times["full"], times["memory"], strict=True)]
            ),
            "ratio_kv_bytes": modes["full"]["kv_bytes"] / modes["memory"]["kv_bytes"],
        }
        del full, cases
    return {
        "overrides": overrides,
        "params": n_params,
        "dtype": m.dtype,
        "num_latents": k,
        "layers": m.n_layers,
        "kv_heads": m.n_kv_heads,
        "head_dim": m.head_dim,
        "kv_bytes_per_token": per_token,
        "compile_and_first_step_s": compile_s,
        "lengths": lengths,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = machine(command_line("benchmarks.latent_memory", argv))
    t0 = time.perf_counter()
    configs = {name: bench_config(name, args) for name in args.config_names}
    result = {
        "benchmark": "latent_memory",
        "machine": finish_machine(info),
        "question_tokens": args.question,
        "page_size": args.page_size,
        "pool_factor": args.pool_factor,
        "repeats": args.repeats,
        "steps_per_repeat": args.steps,
        "settle_steps": args.settle,
        "attention_impl": "reference",
        "wall_s": time.perf_counter() - t0,
        "configs": configs,
    }
    write_json(args.out, result)
    print_report(result)
    return result


def _mib(x: int) -> str:
    return f"{x / 2**20:.2f} MiB"


def print_report(result: dict[str, Any]) -> None:
    rows = []
    for name, c in result["configs"].items():
        for n, r in c["lengths"].items():
            for mode in MODES:
                x = r["modes"][mode]
                full = mode == "full"
                rows.append([
                    name, n, "(a) full" if full else f"(b) memory K={c['num_latents']}",
                    x["text_tokens"], x["memory_tokens"], x["ms_per_token"], _mib(x["kv_bytes"]),
                    _mib(x["cache_pool_bytes"]),
                    f"{r['ratio_time']:.2f}x" if full else "",
                    f"{r['ratio_kv_bytes']:.1f}x" if full else "",
                ])  # fmt: skip
    headers = ["config", "n", "mode", "text tokens", "memory tokens", "ms/token", "KV bytes",
               "page pool",
               "time a/b", "KV a/b"]  # fmt: skip
    print(describe(result["machine"]))
    print(
        f"decode step (C=1, batch 1), median of {result['repeats']} repeats x "
        f"{result['steps_per_repeat']} steps (after {result['settle_steps']} untimed); "
        f"question+generated = {result['question_tokens']} "
        f"text tokens; page size {result['page_size']}, page pool {result['pool_factor']}x the "
        "pages needed; attention: pure-JAX reference"
    )
    print(format_table(headers, rows))


if __name__ == "__main__":
    main()
