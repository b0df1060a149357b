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


def test_model_with_kernel_attention_on_a_tpu_mesh_runs_the_kernels_per_device():
    """`attention_impl="kernel"` in the model's gradient, compiled for a 2 x 2 v5p mesh (rows over
    `data`, heads over `tensor`): each layer holds the three Mosaic kernels, on per-device shards
    (the mesh's platform decides, not the CPU host's default backend)."""
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from grc_jax.core.batch import Rows
    from grc_jax.core.config import GRCConfig, ModelConfig
    from grc_jax.core.sharding import MESH_AXES, activation_sharding
    from grc_jax.model import forward, init_params

    devices = topologies.get_topology_desc(TOPOLOGIES["v5p"], "tpu").devices
    mesh = Mesh(np.array(devices).reshape(2, 1, 2), MESH_AXES)
    cfg = ModelConfig(
        vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=256,
        attention_impl="kernel", attention_chunk=128,
    )  # fmt: skip
    grc = GRCConfig(num_latents=4)
    batch, seq_len = 8, 256

    def loss(params, rows):
        return jnp.sum(forward(params, cfg, grc, rows).logits ** 2)

    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
        jax.eval_shape(lambda: init_params(cfg, grc, jax.random.key(0))),
    )
    row = jax.ShapeDtypeStruct(
        (batch, seq_len), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec("data"))
    )
    with activation_sharding(mesh):
        text = jax.jit(jax.grad(loss)).lower(params, Rows(row, row, row, row, row)).compile()
        text = text.as_text()
    kernels = [line for line in text.splitlines() if "tpu_custom_call" in line]
    for name in ("grc_flash_forward", "grc_flash_dq", "grc_flash_dkv"):
        assert sum(f"%{name}" in line for line in kernels) == cfg.n_layers, name
    # Per device: 4 of 8 rows, 2 of 4 query heads (head-major inside the kernel).
    assert any("f32[4,2,256,32]" in line for line in kernels if "%grc_flash_dq" in line)
