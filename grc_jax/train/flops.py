"""Analytic FLOP counts of the train step and a measured matmul peak for MFU.

Forward FLOPs per row of T tokens (multiply-add = 2 FLOPs), L layers, d = d_model, H / G query /
KV heads of size D, F = d_ff, V = vocab:

    per layer:  2*T*(d*H*D + 2*d*G*D + H*D*d + 3*d*F)      projections and SwiGLU
              + 2*2*T*T*H*D                                 scores and weighted values (dense mask)
    LM head:    2*T*d*V

A train step counts 3x the forward (backward = 2x forward) over the global batch, plus one more
forward per microbatch when GradCache is on (`train.microbatches > 1`); recomputation by remat is
not counted (MFU measures useful model FLOPs). MFU = step FLOPs / step time / peak, where peak is
the best matmul FLOP/s measured on the same devices at start-up (`measure_matmul_flops`).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grc_jax.core.config import Config


def forward_flops(cfg: Config, rows: int) -> float:
    m, t = cfg.model, cfg.data.seq_len
    hd, gd = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    per_layer = (
        2 * t * (m.d_model * hd + 2 * m.d_model * gd + hd * m.d_model + 3 * m.d_model * m.d_ff)
    )
    per_layer += 4 * t * t * hd
    return float(rows * (m.n_layers * per_layer + 2 * t * m.d_model * m.vocab_size))


def train_flops_per_step(cfg: Config, global_rows: int) -> float:
    passes = 3 + (1 if cfg.train.microbatches > 1 else 0)
    return passes * forward_flops(cfg, global_rows)


def measure_matmul_flops(
    mesh: Mesh, n: int = 1024, dtype: str = "float32", repeats: int = 5
) -> float:
    """Aggregate matmul FLOP/s of the mesh's devices: a row-sharded `[n_dev*n, n] @ [n, n]`."""
    devices = mesh.devices.size
    sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    a = jax.device_put(jnp.ones((devices * n, n), dtype), sharding)
    b = jax.device_put(jnp.ones((n, n), dtype), NamedSharding(mesh, PartitionSpec()))
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * devices * n * n * n / min(times)
