"""Decode attention: hybrid paged kernel vs the XLA reference vs JAX's bundled paged attention.

For decode shapes of smollm2_135m (9 query / 3 KV heads, head_dim 64) and llama3_8b (32 / 8, 128),
batch 1-64, context 1k-32k text tokens and 0-16 latent memories (K = 16), one decode step of one
layer's attention is timed (jitted, warmed up, median of repeats) for each implementation:

- `kernel`: the Pallas kernel of this backend (`gpu.py` on GPU, `tpu.py` on TPU);
- `reference`: the pure-JAX reference (`reference.py`), compiled by XLA;
- `jax_paged`: JAX's bundled Pallas paged attention (`jax.experimental.pallas.ops.{gpu,tpu}`),
  only for cases without memories (it knows nothing of latent memories) and in its own
  heads-major page layout.

Achieved bandwidth = bytes of K/V (text + memories) and queries read / time; it is compared with the
device-to-device copy bandwidth measured in the same run (bytes read + written by an elementwise
pass over a large array / time). On CPU only the reference runs (the kernels would run in the
Pallas interpreter, whose timings mean nothing) unless `--interpret` is given.

Imports only jax, numpy and this repository's `pallas_kernels` and `benchmarks.common`, so it runs
on the GPU machines' image (no grain / tensorboardX there).

    python -m benchmarks.attention_kernels            # full sweep
    python -m benchmarks.attention_kernels --quick    # tiny smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.hybrid_paged_attention.reference import hybrid_paged_attention_reference

MODELS = {"smollm2_135m": (9, 3, 64), "llama3_8b": (32, 8, 128)}
NUM_LATENTS = 16
PAGE_SIZE = 16


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    batch: int
    context: int
    memories: int


def full_cases() -> list[Case]:
    cases = []
    for model in MODELS:
        for batch in (1, 8, 64):
            for context in (1024, 8192, 32768):
                if batch * context > 64 * 8192 and model == "llama3_8b" and batch > 8:
                    continue  # keep one layer's KV under a few GB
                for memories in (0, 16):
                    cases.append(Case(model, batch, context, memories))
    return cases


def quick_cases() -> list[Case]:
    return [Case("smollm2_135m", 2, 64, 0), Case("smollm2_135m", 2, 64, 2)]


def make_inputs(case: Case, dtype, seed: int = 0):
    hq, hkv, d = MODELS[case.model]
    rng = np.random.default_rng(seed)
    pages_per_seq = -(-case.context // PAGE_SIZE)
    n_pages = case.batch * pages_per_seq + 1
    n_mem = case.batch * case.memories + 1

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

    tables = rng.permutation(np.arange(1, n_pages)).reshape(case.batch, pages_per_seq)
    mem_tables = (
        rng.permutation(np.arange(1, n_mem)).reshape(case.batch, case.memories)
        if case.memories
        else np.zeros((case.batch, 1), np.int64)
    )
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, d, 2, dtype=np.float32) / d))
    return dict(
        q=rand(case.batch, 1, hq, d),
        q_text_index=jnp.full((case.batch, 1), case.context - 1, jnp.int32),
        k_pages=rand(n_pages, PAGE_SIZE, hkv, d),
        v_pages=rand(n_pages, PAGE_SIZE, hkv, d),
        block_tables=jnp.asarray(tables, jnp.int32),
        text_lengths=jnp.full((case.batch,), case.context, jnp.int32),
        mem_k=rand(n_mem, NUM_LATENTS, hkv, d),
        mem_v=rand(n_mem, NUM_LATENTS, hkv, d),
        mem_tables=jnp.asarray(mem_tables, jnp.int32),
        mem_counts=jnp.full((case.batch,), case.memories, jnp.int32),
        inv_freq=jnp.asarray(inv_freq),
    )


def bytes_read(case: Case, itemsize: int) -> int:
    hq, hkv, d = MODELS[case.model]
    kv_tokens = case.context + case.memories * NUM_LATENTS
    return case.batch * (2 * kv_tokens * hkv * d + hq * d) * itemsize


def implementations(backend: str, interpret: bool) -> dict:
    impls = {"reference": hybrid_paged_attention_reference}
    if backend == "gpu" or interpret:
        from pallas_kernels.hybrid_paged_attention.gpu import hybrid_paged_attention_gpu

        impls["kernel_gpu"] = lambda *a: hybrid_paged_attention_gpu(*a, interpret=backend != "gpu")
    if backend == "tpu":
        from pallas_kernels.hybrid_paged_attention.tpu import hybrid_paged_attention_tpu

        impls["kernel_tpu"] = hybrid_paged_attention_tpu
    return impls


def jax_paged(backend: str):
    """JAX's bundled paged attention for this backend, adapted to our inputs (no memories)."""
    if backend == "gpu":
        from jax.experimental.pallas.ops.gpu import paged_attention as mod

        def run(q, kp, vp, tables, lengths):
            return mod.paged_attention(q, kp, vp, tables, lengths, pages_per_compute_block=8)

    elif backend == "tpu":
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_paged

        def run(q, kp, vp, tables, lengths):
            return tpu_paged(q, kp, vp, lengths, tables, pages_per_compute_block=8)

    else:
        return None
    return run


def timed(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def copy_bandwidth(n_bytes: int, repeats: int) -> float:
    """Device-to-device bandwidth: bytes read + written by one elementwise pass / time."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda a: -a)
    return 2 * n_bytes / timed(f, (x,), repeats)


def run(cases: list[Case], dtype_name: str, repeats: int, interpret: bool) -> dict:
    backend = jax.default_backend()
    dtype = jnp.dtype(dtype_name)
    impls = implementations(backend, interpret)
    bundled = jax_paged(backend)
    copy_bytes = (1 << 30) if backend != "cpu" else (1 << 27)
    copy_bw = copy_bandwidth(copy_bytes, repeats)
    rows = []
    for case in cases:
        inputs = make_inputs(case, dtype)
        args = tuple(inputs.values())
        n_bytes = bytes_read(case, dtype.itemsize)
        for name, fn in impls.items():
            t = timed(jax.jit(fn), args, repeats)
            rows.append(
                dict(dataclasses.asdict(case), impl=name, ms=t * 1e3, gbps=n_bytes / t / 1e9)
            )
        if bundled is not None and case.memories == 0:
            kp = jnp.transpose(inputs["k_pages"], (2, 0, 1, 3))  # heads-major, built once
            vp = jnp.transpose(inputs["v_pages"], (2, 0, 1, 3))
            bargs = (inputs["q"][:, 0], kp, vp, inputs["block_tables"], inputs["text_lengths"])
            t = timed(jax.jit(bundled), bargs, repeats)
            rows.append(
                dict(dataclasses.asdict(case), impl="jax_paged", ms=t * 1e3, gbps=n_bytes / t / 1e9)
            )
    for r in rows:
        r["fraction_of_copy_bw"] = r["gbps"] * 1e9 / copy_bw
    return {
        "backend": backend,
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "dtype": dtype_name,
        "page_size": PAGE_SIZE,
        "num_latents": NUM_LATENTS,
        "copy_bandwidth_gbps": copy_bw / 1e9,
        "rows": rows,
    }


def table(result: dict) -> str:
    lines = [
        f"backend {result['backend']} ({result['device']}), jax {result['jax']}, "
        f"{result['dtype']}, copy bandwidth {result['copy_bandwidth_gbps']:.1f} GB/s",
        "| model | batch | context | memories | impl | ms | GB/s | of copy bw |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['context']} | {r['memories']} | {r['impl']} | "
            f"{r['ms']:.3f} | {r['gbps']:.1f} | {100 * r['fraction_of_copy_bw']:.1f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (smoke test)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--interpret", action="store_true", help="also time kernels interpreted on CPU")
    p.add_argument("--out", default="benchmarks/results/attention_kernels.json")
    args = p.parse_args(argv)
    cases = quick_cases() if args.quick else full_cases()
    result = run(cases, args.dtype, 3 if args.quick else args.repeats, args.interpret)
    print(table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
