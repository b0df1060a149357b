"""Losses at `llama3_8b` shapes: one-hot pooling and dense InfoNCE against their replacements.

Compile-only: each piece's forward + backward is lowered from `ShapeDtypeStruct`s and compiled
(no weights, nothing runs), and XLA's cost analysis (FLOPs) and memory analysis (temporary bytes)
are read off the compiled program, per device. Shapes are those of `configs/llama3_8b.yaml`:
seq_len 4096 and K = 16 latents give 4096 // 19 = 215 slots a row, d_model 4096, no projection
(embeddings of width 4096), hidden states in the model's dtype (bfloat16); the global batch is
`--batch-size` rows (`n` = rows x 215 slots).

- pooling: `pool_latents` (mean) of `[rows, 4096, 4096]` hidden states, then its gradient;
- InfoNCE: the loss sum over `[n, 4096]` slot embeddings and its gradient (embeddings and
  temperature).

XLA counts a while loop's body once, and the tiled InfoNCE runs its tile loops as many times as
the batch has query tiles and document tiles: its compiled FLOPs are those of one tile (plus
the sorting and gathering around the loops). So its FLOPs are also given for batches of real
occupancy: records (`--data`, default: the synthetic corpus) laid out by the training pipeline at
these shapes with one token per word (a subword tokenizer makes longer examples, fewer per row, so
fewer queries and documents: this overstates the tiles), counting the matmul FLOPs of the tiles
that run (`8 * query_tile * doc_tile * 4096` each: scores, then in the backward scores again and
the two gradients). The old versions are kept below for the comparison.

Run from the repository root: `python -m benchmarks.loss_scaling` (one device), or with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` and `--devices 8` for the batch split over 8
devices (`mesh.fsdp`, as `llama3_8b` trains).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks.common import (
    RESULTS_DIR,
    command_line,
    describe,
    finish_machine,
    format_table,
    machine,
    write_json,
)
from grc_jax.core.config import Config, MeshConfig, load_config
from grc_jax.core.roles import DOC, LATENT, QUERY
from grc_jax.core.sharding import activation_sharding, make_mesh
from grc_jax.data.pipeline import slots_per_row, train_dataset
from grc_jax.data.sources import JsonlSource
from grc_jax.data.synth import synthesize
from grc_jax.model.head import pool_latents
from grc_jax.train.flops import forward_flops
from grc_jax.train.infonce import DOC_TILE, QUERY_TILE, info_nce

ROOT = Path(__file__).resolve().parents[1]
_NEG = -1e30


def pool_latents_einsum(hidden, segment_ids, block_ids, roles, num_slots, pooling):
    """The old `pool_latents`: a one-hot `[b, t, s]` matrix times the hidden states."""
    latent0 = (roles == LATENT) & (block_ids == 0)
    slot = segment_ids[:, :, None] == jnp.arange(1, num_slots + 1)[None, None, :]
    member = (slot & latent0[:, :, None]).astype(jnp.float32)
    counts = jnp.maximum(jnp.sum(member, axis=1), 1.0)
    summed = jnp.einsum("bts,btd->bsd", member, hidden.astype(jnp.float32))
    return summed / counts[..., None]


def info_nce_dense(emb, kind, group, positive, doc, temp):
    """The old `info_nce`: every slot scored against every slot, `[n, n]`."""
    is_q, is_d = kind == QUERY, kind == DOC
    scores = (emb @ emb.T) / temp
    pos = is_d[None, :] & (positive[None, :] == 1) & (group[None, :] == group[:, None])
    duplicate = is_d[None, :] & (doc[None, :] == doc[:, None]) & ~pos
    scores = jnp.where(is_d[None, :] & ~duplicate, scores, _NEG)
    logz = jax.nn.logsumexp(scores, axis=-1)
    has_pos = is_q & jnp.any(pos, axis=-1)
    pos_score = jnp.max(jnp.where(pos, scores, _NEG), axis=-1)
    return jnp.sum(jnp.where(has_pos, logz - pos_score, 0.0)), jnp.sum(has_pos.astype(jnp.float32))


class WordTok:
    """One token per whitespace word (ids from a hash): no tokenizer to train or download."""

    vocab_size = 128256
    pad_id, bos_id, eos_id = 0, 1, 2

    def encode(self, s: str) -> list[int]:
        return [3 + zlib.crc32(w.encode()) % 128000 for w in s.split()]

    def decode(self, ids) -> str:
        return ""


def _compiled(fn, args, shardings, mesh):
    """(FLOPs, temporary bytes) per device of `fn` compiled for `args` (ShapeDtypeStructs)."""
    if mesh is None:
        compiled = jax.jit(fn).lower(*args).compile()
    else:
        with activation_sharding(mesh):
            compiled = jax.jit(fn, in_shardings=shardings).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    temp = compiled.memory_analysis().temp_size_in_bytes
    return float(cost.get("flops", float("nan"))), int(temp)


def pooling_programs(cfg: Config, rows: int) -> dict[str, Any]:
    """Forward + backward of each pooling, as (function, argument shapes)."""
    t, d, s = cfg.data.seq_len, cfg.model.d_model, slots_per_row(cfg)
    dtype = jnp.dtype(cfg.model.dtype)
    args = [jax.ShapeDtypeStruct((rows, t, d), dtype)]
    args += [jax.ShapeDtypeStruct((rows, t), jnp.int32)] * 3
    args += [jax.ShapeDtypeStruct((rows, s, d), jnp.float32)]  # a cotangent of the pooled

    def program(pool):
        def fn(hidden, seg, blk, roles, cot):
            def loss(h):
                return jnp.sum(pool(h, seg, blk, roles, s, cfg.grc.pooling) * cot)

            return jax.value_and_grad(loss)(hidden)

        return fn

    return {"old": (program(pool_latents_einsum), args), "new": (program(pool_latents), args)}


def info_nce_programs(cfg: Config, rows: int) -> dict[str, Any]:
    """Loss sum and its gradient (embeddings, temperature) of each InfoNCE."""
    n = rows * slots_per_row(cfg)
    p = cfg.grc.projection_dim or cfg.model.d_model
    args = [jax.ShapeDtypeStruct((n, p), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32)]
    args += [jax.ShapeDtypeStruct((n,), jnp.int32)] * 4

    def program(nce):
        def fn(emb, temp, *meta):
            return jax.value_and_grad(lambda e, t: nce(e, *meta, t)[0], argnums=(0, 1))(emb, temp)

        return fn

    return {"old": (program(info_nce_dense), args), "new": (program(info_nce), args)}


def occupancy(cfg: Config, data: Path, batches: int, devices: int) -> dict[str, Any]:
    """Queries and documents of real batches, and the tiles the tiled InfoNCE runs on the
    busiest device (its queries against every document)."""
    ds, _ = train_dataset(cfg, WordTok(), JsonlSource(data))
    it = iter(ds)
    per_batch = []
    for _ in range(batches):
        b = next(it)
        kind = np.asarray(b.seg_kind)
        per_device = kind.reshape(devices, -1)
        nq = (per_device == QUERY).sum(axis=1)
        nd = int((kind == DOC).sum())
        n_local = per_device.shape[1]
        qt, dt = min(QUERY_TILE, n_local), min(DOC_TILE, kind.size)
        tiles = max(math.ceil(q / qt) for q in nq) * math.ceil(nd / dt)
        per_batch.append(
            {"queries": int(nq.sum()), "documents": nd, "filled": float((kind > 0).mean()),
             "tiles": tiles, "tile": [qt, dt]}
        )  # fmt: skip
    return {
        "batches": per_batch,
        "max_tiles": max(x["tiles"] for x in per_batch),
        "tile": per_batch[0]["tile"],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "llama3_8b.yaml"))
    ap.add_argument("--batch-sizes", default="64,256", help="global rows, comma-separated")
    ap.add_argument("--devices", type=int, default=1, help="split the batch over this many")
    ap.add_argument("--data", default="", help="JSONL records for occupancy (default: synthetic)")
    ap.add_argument("--occupancy-batches", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "loss_scaling.json"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = machine(command_line("benchmarks.loss_scaling", argv))
    config = ROOT / "configs" / "tiny.yaml" if args.quick else args.config
    batch_sizes = "4" if args.quick else args.batch_sizes
    devices = args.devices
    mesh = None
    if devices > 1:
        mesh = make_mesh(MeshConfig(data=1, fsdp=devices, tensor=1), jax.devices()[:devices])
    rows_split = NamedSharding(mesh, PartitionSpec(("data", "fsdp"))) if mesh else None
    whole = NamedSharding(mesh, PartitionSpec()) if mesh else None

    results: dict[str, Any] = {}
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else None
        if data is None:
            synthesize(tmp, seed=0)
            data = Path(tmp) / "train.jsonl"
        for rows in [int(x) for x in batch_sizes.split(",")]:
            cfg = load_config(config, [f"data.batch_size={rows}"])
            s = slots_per_row(cfg)
            occ = occupancy(cfg, data, args.occupancy_batches, devices)
            p = cfg.grc.projection_dim or cfg.model.d_model
            qt, dt = occ["tile"]
            tile_flops = 8.0 * qt * dt * p
            model = forward_flops(cfg, rows) / devices
            entry: dict[str, Any] = {"slots": rows * s, "occupancy": occ, "forward_flops": model}
            pieces = {
                "pool_latents": pooling_programs(cfg, rows),
                "info_nce": info_nce_programs(cfg, rows),
            }
            for piece, programs in pieces.items():
                for impl, (fn, shapes) in programs.items():
                    shard = None
                    if mesh is not None:  # rows (or slots) split, the temperature whole
                        shard = tuple(whole if not x.shape else rows_split for x in shapes)
                    flops, temp = _compiled(fn, shapes, shard, mesh)
                    run_flops = flops
                    if piece == "info_nce" and impl == "new":
                        # XLA counted one query tile against one document tile; add the rest.
                        run_flops = flops + (occ["max_tiles"] - 1) * tile_flops
                    entry[f"{piece}/{impl}"] = {
                        "flops": flops, "temp_bytes": temp, "flops_at_occupancy": run_flops
                    }  # fmt: skip
                    table.append([
                        rows, rows * s, piece, impl, flops, run_flops,
                        100.0 * run_flops / model, temp / 2**30,
                    ])  # fmt: skip
                    print(f"compiled {piece} ({impl}) for {rows} rows", flush=True)
            results[str(rows)] = entry
    info = finish_machine(info)
    headers = [
        "rows", "slots n", "piece", "impl", "FLOPs (compiled)", "FLOPs run",
        "% of fwd", "temp GiB",
    ]  # fmt: skip
    print(describe(info))
    print(f"per device, {devices} device(s); occupancy from {args.data or 'the synthetic corpus'}")
    for rows, entry in results.items():
        for b in entry["occupancy"]["batches"]:
            print(f"  {rows} rows: {b}")
    print(format_table(headers, table))
    payload = {"benchmark": "loss_scaling", "machine": info, "devices": devices, "results": results}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
