"""Pooling of latent hidden states by scatter / gather, against the one-hot einsum it replaced:
mean and last, values and gradients, on packed rows and on a batch sharded over 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from grc_jax.core.config import MeshConfig
from grc_jax.core.roles import LATENT
from grc_jax.core.sharding import activation_sharding, make_mesh
from grc_jax.data.layout import gen, latents, pack_examples, text
from grc_jax.model.head import pool_latents

K = 3


def _pool_latents_einsum(hidden, segment_ids, block_ids, roles, num_slots, pooling):
    """`pool_latents` as first written: a one-hot `[b, t, s]` matrix times the hidden states."""
    latent0 = (roles == LATENT) & (block_ids == 0)
    slot = segment_ids[:, :, None] == jnp.arange(1, num_slots + 1)[None, None, :]  # [b, t, s]
    member = (slot & latent0[:, :, None]).astype(jnp.float32)
    if pooling == "last":
        idx = jnp.arange(hidden.shape[1], dtype=jnp.float32)[None, :, None]
        last = jnp.max(member * (idx + 1), axis=1, keepdims=True) - 1
        member = member * (idx == last)
    counts = jnp.maximum(jnp.sum(member, axis=1), 1.0)  # [b, s]
    summed = jnp.einsum("bts,btd->bsd", member, hidden.astype(jnp.float32))
    return summed / counts[..., None]


def _rows(seed, n_rows=8, seq_len=64):
    """Packed rows of random examples: compression blocks (latents) before and after consumer
    blocks, examples without latents, padding; latents also in later blocks (not pooled)."""
    rng = np.random.default_rng(seed)

    def ids(n):
        return rng.integers(4, 50, size=n)

    examples = []
    while len(examples) < 6 * n_rows:
        blocks = [
            [text(ids(rng.integers(1, 6))), gen(ids(2))]
            + ([latents(K)] if rng.random() < 0.8 else [])
        ]
        for _ in range(rng.integers(0, 3)):
            blocks.append(
                [text(ids(rng.integers(1, 4)))] + ([latents(K)] if rng.random() < 0.5 else [])
            )
        examples.append(blocks)
    rows = pack_examples(examples, seq_len, K, "independent")
    assert rows.tokens.shape[0] >= n_rows
    return jax.tree.map(lambda x: jnp.asarray(x[:n_rows]), rows)


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("num_slots", [3, 12])  # 3: segment ids past the slots are ignored
def test_equals_the_one_hot_einsum(pooling, num_slots):
    rows = _rows(0)
    assert int(rows.segment_ids.max()) > 3
    args = (rows.segment_ids, rows.block_ids, rows.roles, num_slots, pooling)
    hidden = jax.random.normal(jax.random.key(0), (*rows.tokens.shape, 16))
    got, vjp_got = jax.vjp(lambda h: pool_latents(h, *args), hidden)
    want, vjp_want = jax.vjp(lambda h: _pool_latents_einsum(h, *args), hidden)
    assert got.dtype == jnp.float32 and got.shape == (8, num_slots, 16)
    assert float(jnp.mean(jnp.all(want == 0, axis=-1))) > 0.05  # some empty slots
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    cotangent = jax.random.normal(jax.random.key(1), got.shape)
    np.testing.assert_allclose(
        np.asarray(vjp_got(cotangent)[0]), np.asarray(vjp_want(cotangent)[0]), atol=1e-5
    )


def test_bfloat16_hidden_pools_in_float32():
    rows = _rows(1)
    hidden = jax.random.normal(jax.random.key(2), (*rows.tokens.shape, 8)).astype(jnp.bfloat16)
    args = (rows.segment_ids, rows.block_ids, rows.roles, 12, "mean")
    got = pool_latents(hidden, *args)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, _pool_latents_einsum(hidden, *args), atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_sharded_batch_stays_sharded(devices, pooling):
    """On a batch split over 8 devices: the same values and gradients, and the hidden states are
    never gathered across devices."""
    rows = _rows(2)
    hidden = jax.random.normal(jax.random.key(3), (*rows.tokens.shape, 16))
    mesh = make_mesh(MeshConfig(data=8))
    split = NamedSharding(mesh, PartitionSpec("data"))
    args = [
        jax.device_put(x, split) for x in (hidden, rows.segment_ids, rows.block_ids, rows.roles)
    ]

    def loss(h, *meta):
        return jnp.sum(jnp.sin(pool_latents(h, *meta, 12, pooling)))

    want = jax.value_and_grad(
        lambda h: jnp.sum(jnp.sin(_pool_latents_einsum(h, *args[1:], 12, pooling)))
    )(hidden)
    with activation_sharding(mesh):
        fn = jax.jit(jax.value_and_grad(loss))
        got = fn(*args)
        text_ = fn.lower(*args).compile().as_text()
    assert "all-gather" not in text_  # (an all-reduce adds up the scalar loss)
    assert got[1].sharding.is_equivalent_to(split, hidden.ndim)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=1e-5)
