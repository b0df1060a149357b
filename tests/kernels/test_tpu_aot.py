"""Pallas TPU kernels compiled by Mosaic ahead of time, without TPU hardware.

With the libtpu wheel, `jax.experimental.topologies.get_topology_desc` gives compile-only TPU
devices; each kernel is jitted on ShapeDtypeStructs placed on one of them (under
`jax.default_device`) and `.lower(...).compile()` runs the real Mosaic compiler, so block shapes,
layouts and VMEM use that Mosaic rejects fail here rather than on a rented TPU. The interpreter
tests check the numbers; this checks that the kernels compile, per TPU generation and per model
shape. Slow, and skipped without libtpu (`docs/kernels.md`, "Compiling ahead of time").

To add a kernel, add one row to `KERNELS`: a name and a builder that, given a model's attention
shape, returns the function to jit and its abstract arguments.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable

import jax
import jax.numpy as jnp
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("libtpu") is None, reason="needs the libtpu wheel (jax[tpu])"
    ),
]

# TPU generation -> the smallest standard topology (compiling for one chip needs no more).
TOPOLOGIES = {"v4": "v4:2x2x1", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Attention shape of a model: query heads, KV heads, head dim, KV dtype, and the training
    sequence length (for the training kernels)."""

    heads: int
    kv_heads: int
    head_dim: int
    dtype: type
    train_seq_len: int


MODELS = {
    "smollm2_f32": ModelShape(9, 3, 64, jnp.float32, 2048),  # 3 x 64 = 192 lanes: not 128-aligned
    "smollm2_bf16": ModelShape(9, 3, 64, jnp.bfloat16, 2048),
    "llama3_8b_bf16": ModelShape(32, 8, 128, jnp.bfloat16, 4096),
}

Builder = Callable[[ModelShape], tuple[Callable, tuple[jax.ShapeDtypeStruct, ...]]]


def _hybrid_paged_attention_decode(m: ModelShape):
    """One decode step at the engine's default sizes (EngineOptions: page_size 16, 512 pages,
    batch 8, 1024 text tokens, 16 memories per request) with K = 16 latents per memory."""
    from pallas_kernels.hybrid_paged_attention.tpu import hybrid_paged_attention_tpu

    batch, page_size, n_pages, max_seq_len, max_mem, num_latents = 8, 16, 512, 1024, 16, 16
    i32, f32 = jnp.int32, jnp.float32
    kv_page = (n_pages, page_size, m.kv_heads, m.head_dim)
    memory = (batch * max_mem + 1, num_latents, m.kv_heads, m.head_dim)
    shapes = [
        ((batch, 1, m.heads, m.head_dim), m.dtype),  # q
        ((batch, 1), i32),  # q_text_index
        (kv_page, m.dtype),  # k_pages
        (kv_page, m.dtype),  # v_pages
        ((batch, max_seq_len // page_size), i32),  # block_tables
        ((batch,), i32),  # text_lengths
        (memory, m.dtype),  # mem_k
        (memory, m.dtype),  # mem_v
        ((batch, max_mem), i32),  # mem_tables
        ((batch,), i32),  # mem_counts
        ((m.head_dim // 2,), f32),  # inv_freq
    ]
    return hybrid_paged_attention_tpu, tuple(jax.ShapeDtypeStruct(s, d) for s, d in shapes)


def _flash_training(m: ModelShape, with_backward: bool, batch: int = 2, block: int = 512):
    """GRC flash attention of the training pass (`grc_jax.model.flash_tpu`) at the model's
    training length, blocks of 512: the forward alone, or `jax.vjp` (forward, dq and dk/dv)."""
    from grc_jax.model.flash import flash_layout
    from grc_jax.model.flash_tpu import flash_attention_tpu
    from grc_jax.model.mask import TokenMeta

    def fn(q, k, v, dout, segment_ids, block_ids, roles):
        meta = TokenMeta.build(segment_ids, block_ids, roles, "independent")
        layout = flash_layout(meta, block)

        def attend(q, k, v):
            return flash_attention_tpu(q, k, v, layout, block_q=block, block_k=block)

        if not with_backward:
            return attend(q, k, v)
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(dout)

    t = m.train_seq_len
    q = jax.ShapeDtypeStruct((batch, t, m.heads, m.head_dim), m.dtype)
    kv = jax.ShapeDtypeStruct((batch, t, m.kv_heads, m.head_dim), m.dtype)
    meta = jax.ShapeDtypeStruct((batch, t), jnp.int32)
    return fn, (q, kv, kv, q, meta, meta, meta)


# (name, builder): one row per kernel compiled by Mosaic ahead of time.
KERNELS: list[tuple[str, Builder]] = [
    ("hybrid_paged_attention_tpu", _hybrid_paged_attention_decode),
    ("flash_attention_tpu_forward", lambda m: _flash_training(m, with_backward=False)),
    ("flash_attention_tpu_vjp", lambda m: _flash_training(m, with_backward=True)),
]


@pytest.fixture(scope="module", params=list(TOPOLOGIES))
def tpu_device(request):
    """A compile-only device of the generation's topology."""
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(TOPOLOGIES[request.param], "tpu")
    return topology.devices[0]


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("kernel", [pytest.param(b, id=n) for n, b in KERNELS])
def test_kernel_compiles_with_mosaic(tpu_device, kernel: Builder, model: str):
    fn, abstract = kernel(MODELS[model])
    on_device = jax.sharding.SingleDeviceSharding(tpu_device)
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_device) for a in abstract]
    with jax.default_device(tpu_device):
        compiled = jax.jit(fn).lower(*args).compile()
    assert "tpu_custom_call" in compiled.as_text()  # the Mosaic kernel, not a fallback
