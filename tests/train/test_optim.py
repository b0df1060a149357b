"""Optimizer: schedule, weight-decay mask, frozen base, LoRA."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from grc_jax.core.batch import Rows
from grc_jax.core.config import Config, GRCConfig, ModelConfig, TrainConfig
from grc_jax.core.trees import path_names
from grc_jax.model import forward
from grc_jax.model.lora import init_lora, merge_lora
from grc_jax.model.params import init_grc_params
from grc_jax.train.optim import decay_mask, lr_schedule, make_optimizer

MODEL = ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
)
CFG = Config(model=MODEL, grc=GRCConfig(num_latents=2))


def _paths(tree):
    return {"/".join(path_names(p)): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_schedule_warmup_then_cosine_to_floor():
    tc = TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-3, min_lr_ratio=0.1)
    s = lr_schedule(tc)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(s(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(s(100)), 1e-4, rtol=1e-5)
    assert float(s(50)) < 1e-3


def test_decay_mask_skips_norms_biases_latents_temperature():
    params = init_grc_params(
        dataclasses.replace(CFG, model=dataclasses.replace(MODEL, qkv_bias=True)),
        jax.random.key(0),
    )
    mask = _paths(decay_mask(params))
    assert mask["model/layers_0/attn/q/kernel"]
    assert mask["model/embed"]
    assert not mask["model/latents"]
    assert not mask["model/layers_0/attn/q/bias"]
    assert not mask["model/layers_0/attn_norm/scale"]
    assert not mask["model/final_norm/scale"]
    assert not mask["head/log_temperature"]


def _one_update(cfg, params):
    opt = make_optimizer(cfg.train, params)
    state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(2):  # step 0 has lr 0 under warmup
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_freeze_base_trains_only_latents_and_head():
    cfg = dataclasses.replace(CFG, train=TrainConfig(freeze_base=True, warmup_steps=1))
    params = init_grc_params(cfg, jax.random.key(0))
    new = _one_update(cfg, params)
    before, after = _paths(params), _paths(new)
    for key in before:
        changed = not np.array_equal(np.asarray(before[key]), np.asarray(after[key]))
        should = "/latents" in key or key.startswith("head/")
        assert changed == should, key


@pytest.mark.slow  # long: `make test-all` (README, Tests)
def test_lora_starts_at_base_and_trains_only_factors():
    cfg = dataclasses.replace(CFG, train=TrainConfig(lora_rank=4, warmup_steps=1))
    params = init_grc_params(cfg, jax.random.key(0))
    assert len(params.lora) == MODEL.n_layers * 7  # q k v o gate up down per layer
    batch = Rows(
        tokens=jnp.arange(12)[None] % 60,
        segment_ids=jnp.ones((1, 12), jnp.int32),
        block_ids=jnp.zeros((1, 12), jnp.int32),
        roles=jnp.ones((1, 12), jnp.int32),
        positions=jnp.arange(12)[None],
    )
    base = forward(params.model, MODEL, cfg.grc, batch).logits
    merged = forward(params.merged(False), MODEL, cfg.grc, batch).logits
    np.testing.assert_array_equal(np.asarray(base), np.asarray(merged))  # b = 0 at init
    new = _one_update(cfg, params)
    before, after = _paths(params), _paths(new)
    for key in before:
        changed = not np.array_equal(np.asarray(before[key]), np.asarray(after[key]))
        should = (
            key.startswith("lora/")
            and key.endswith("/b")
            or key.startswith("lora/")
            and key.endswith("/a")
            or "/latents" in key
            or key.startswith("head/")
        )
        assert changed == should, key
    # After the update the merged model differs from the base.
    moved = forward(new.merged(False), MODEL, cfg.grc, batch).logits
    assert float(jnp.max(jnp.abs(moved - base))) > 0


@pytest.mark.parametrize("scanned", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_lora_merge_matches_dense_delta(scanned):
    from grc_jax.model import init_params, stack_layers

    p = init_params(MODEL, CFG.grc, jax.random.key(1))
    if scanned:
        p = stack_layers(p, MODEL.n_layers)
    lora = init_lora(p, 3, scanned, jax.random.key(2))
    lora = jax.tree.map(lambda x: x + 0.1, lora)  # non-zero b
    merged = merge_lora(p, lora, scanned)
    layer = (lambda t: t["layers"]) if scanned else (lambda t: t["layers_1"])
    key = "layers/attn/o/kernel" if scanned else "layers_1/attn/o/kernel"
    f = lora[key]
    w = layer(p)["attn"]["o"]["kernel"]
    delta = np.einsum("...ir,...ro->...io", f["a"], f["b"]).reshape(w.shape)
    got = layer(merged)["attn"]["o"]["kernel"]
    np.testing.assert_allclose(got, w + delta, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("extra", [{}, {"freeze_base": True}, {"lora_rank": 2}])
def test_sharded_state_for_every_optimizer_variant(devices, extra):
    """Optimizer moments take their parameter's sharding, also under multi_transform (frozen)."""
    from jax.sharding import PartitionSpec

    from grc_jax.core.config import MeshConfig
    from grc_jax.core.sharding import make_mesh
    from grc_jax.train.state import create_state

    cfg = dataclasses.replace(
        CFG, mesh=MeshConfig(data=2, fsdp=4, tensor=1), train=TrainConfig(**extra)
    )
    state, shardings = create_state(cfg, make_mesh(cfg.mesh), jax.random.key(0))
    # The latent table trains in every variant; its spec is (None, "fsdp") on this mesh.
    latent_spec = state.params.model["latents"].sharding.spec
    assert latent_spec == PartitionSpec(None, "fsdp")
    flat = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    moments = [leaf for path, leaf in flat if jax.tree_util.keystr(path).endswith("['latents']")]
    assert len(moments) == 2, "expected AdamW's two moments for the latent table"
    for m in moments:
        assert m.sharding.spec == latent_spec
    frozen = [p for p, _ in flat if jax.tree_util.keystr(p).endswith("['embed']")]
    assert bool(frozen) == (not extra), "frozen params must carry no optimizer moments"
