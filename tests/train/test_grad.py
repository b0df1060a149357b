"""A frozen base: only the trainable leaves are differentiated and updated; the same trainable
update as differentiating everything (LoRA merged, as the step did before); frozen leaves
unchanged bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from grc_jax.core.config import Config, GRCConfig, MeshConfig, TrainConfig
from grc_jax.core.sharding import make_mesh
from grc_jax.model.params import GRCParams
from grc_jax.train.grad import combine, loss_and_grads, partition
from grc_jax.train.losses import grc_loss
from grc_jax.train.optim import make_optimizer, trainable_mask
from grc_jax.train.state import TrainState, create_state
from grc_jax.train.step import batch_shardings, make_train_step
from tests.train.test_losses import MODEL, K, _batch

GRC = GRCConfig(num_latents=K, projection_dim=16, learnable_temperature=True)


def _cfg(**train) -> Config:
    tc = TrainConfig(warmup_steps=1, learning_rate=1e-2, **train)
    return Config(model=MODEL, grc=GRC, mesh=MeshConfig(data=1), train=tc)


def _paths(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def _state(cfg):
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    state, shardings = create_state(cfg, mesh, jax.random.key(0))
    # LoRA's b starts at zero: move it so that the factors' gradients are all non-zero.
    if state.params.lora is not None:
        lora = jax.tree.map(lambda x: x + 0.01, state.params.lora)
        state = state.replace(params=state.params.replace(lora=lora))
    return mesh, state, shardings


def test_partition_and_combine_round_trip():
    cfg = _cfg(lora_rank=2)
    _, state, _ = _state(cfg)
    mask = trainable_mask(state.params, cfg.train)
    train, frozen = partition(state.params, mask)
    assert set(_paths(train)) | set(_paths(frozen)) == set(_paths(state.params))
    assert not set(_paths(train)) & set(_paths(frozen))
    assert "['latents']" in " ".join(_paths(train)) and ".lora" in " ".join(_paths(train))
    back = combine(train, frozen)
    assert jax.tree.structure(back) == jax.tree.structure(state.params)
    assert trainable_mask(state.params, TrainConfig()) is None  # nothing frozen


@pytest.mark.parametrize("extra", [{"freeze_base": True}, {"lora_rank": 2}])
@pytest.mark.parametrize("microbatches", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_trainable_gradients_equal_the_full_gradient(extra, microbatches):
    cfg = _cfg(**extra)
    _, state, _ = _state(cfg)
    params, batch = state.params, _batch(1)
    mask = trainable_mask(params, cfg.train)
    full = jax.jit(lambda p, b: loss_and_grads(p, MODEL, GRC, b, microbatches))
    part = jax.jit(lambda p, b: loss_and_grads(p, MODEL, GRC, b, microbatches, mask))
    (loss_f, _, g_f), (loss_p, _, g_p) = full(params, batch), part(params, batch)
    np.testing.assert_allclose(float(loss_p), float(loss_f), rtol=1e-6)
    flags = _paths(mask)
    want, got = _paths(g_f), _paths(g_p)
    for key, trains in flags.items():
        if trains:
            scale = np.abs(want[key]).max() + 1e-12
            np.testing.assert_allclose(got[key] / scale, want[key] / scale, atol=1e-5, err_msg=key)
        else:
            assert not got[key].any(), f"{key}: a frozen leaf must get a zero gradient"


def _reference_step(cfg):
    """The step before frozen leaves were split off: every leaf differentiated, LoRA merged."""

    def step(state, batch):
        opt = make_optimizer(cfg.train, state.params)

        def loss(p):
            merged = GRCParams(model=p.merged(cfg.model.scan_layers), head=p.head)
            return grc_loss(merged, cfg.model, cfg.grc, batch)

        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        return new, metrics

    return jax.jit(step)


@pytest.mark.parametrize("extra", [{"freeze_base": True}, {"lora_rank": 2}])
def test_frozen_step_matches_the_full_gradient_step(extra):
    cfg = _cfg(**extra)
    mesh, state, shardings = _state(cfg)
    batches = [_batch(s) for s in (2, 3, 4)]
    bsh = batch_shardings(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                       batches[0]), mesh)  # fmt: skip
    new_step, ref_step = make_train_step(cfg, mesh, shardings, bsh), _reference_step(cfg)
    initial = _paths(state.params)
    ref = jax.tree.map(jnp.copy, state)  # the new step donates its state
    for batch in batches:
        state, metrics = new_step(state, batch)
        ref, ref_metrics = ref_step(ref, batch)
        np.testing.assert_allclose(
            float(metrics["loss/total"]), float(ref_metrics["loss/total"]), rtol=1e-5
        )
    assert float(metrics["params_finite"]) == 1.0
    got, want = _paths(state.params), _paths(ref.params)
    mask = _paths(trainable_mask(state.params, cfg.train))
    for key, trains in mask.items():
        if trains:
            assert not np.array_equal(got[key], initial[key]), f"{key} did not train"
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(got[key], initial[key], err_msg=key)


@pytest.mark.slow  # long: `make test-all` (README, Tests)
def test_grad_norm_counts_only_trainable_leaves():
    cfg = _cfg(freeze_base=True)
    mesh, state, shardings = _state(cfg)
    batch = _batch(5)
    mask = trainable_mask(state.params, cfg.train)
    _, _, grads = loss_and_grads(state.params, MODEL, GRC, batch, 1, mask)
    want = float(optax.tree.norm(partition(grads, mask)[0]))
    bsh = batch_shardings(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch),
                          mesh)  # fmt: skip
    _, metrics = make_train_step(cfg, mesh, shardings, bsh)(state, batch)
    np.testing.assert_allclose(float(metrics["grad_norm"]), want, rtol=1e-5)
