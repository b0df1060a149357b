"""The jitted train step: loss + grads (GradCache when microbatched), clip, AdamW, metrics."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grc_jax.core.batch import Batch
from grc_jax.core.config import Config
from grc_jax.core.sharding import activation_sharding, logical_to_spec
from grc_jax.train.grad import combine, loss_and_grads, partition
from grc_jax.train.optim import lr_schedule, make_optimizer, trainable_mask
from grc_jax.train.state import TrainState


def row_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """A batch array's sharding: split over ("data", "fsdp") on its leading (row) axis."""
    names = ("activation_batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, logical_to_spec(names, shape, dict(mesh.shape)))


def batch_shardings(batch_shape: Batch, mesh: Mesh) -> Batch:
    """Every batch array is split over ("data", "fsdp") on its leading (row) axis."""
    return jax.tree.map(lambda x: row_sharding(tuple(x.shape), mesh), batch_shape)


def make_train_step(
    cfg: Config, mesh: Mesh, shardings: TrainState, batch_sharding: Batch
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """`step(state, batch) -> (state, metrics)`, jitted with explicit in/out shardings."""
    schedule = lr_schedule(cfg.train)

    def step(state: TrainState, batch: Batch):
        optimizer = make_optimizer(cfg.train, state.params)
        # With a frozen base only the trainable leaves are differentiated, updated and checked;
        # the frozen ones pass through untouched (bit for bit).
        trainable = trainable_mask(state.params, cfg.train)
        loss, metrics, grads = loss_and_grads(
            state.params, cfg.model, cfg.grc, batch, cfg.train.microbatches, trainable,
            cfg.train.logits_at,
        )  # fmt: skip
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        changed = params
        if trainable is not None:
            grads, _ = partition(grads, trainable)
            changed, _ = partition(params, trainable)
            params = combine(changed, partition(state.params, trainable)[1])
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
        metrics["temperature"] = jnp.exp(params.head.log_temperature)
        # A finite loss can still come with an update that overflows the params: check both.
        metrics["params_finite"] = jax.tree.reduce(
            jnp.logical_and, jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), changed)
        ).astype(jnp.float32)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(
        step,
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
    )

    def run(state, batch):
        with activation_sharding(mesh):
            return jitted(state, batch)

    run.jitted = jitted  # for ahead-of-time lowering (`grc aot`), inside `activation_sharding`
    return run
