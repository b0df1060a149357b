"""Train state (a pytree) and its creation, sharded on the mesh by the logical-axis rules."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grc_jax.core.config import Config
from grc_jax.core.sharding import activation_sharding, param_specs
from grc_jax.core.trees import path_names
from grc_jax.model import abstract_params
from grc_jax.model.params import GRCParams, init_grc_params
from grc_jax.train.optim import make_optimizer


@flax.struct.dataclass
class TrainState:
    step: Any  # int32 scalar (also a ShapeDtypeStruct under eval_shape)
    params: GRCParams
    opt_state: Any


def param_partition_specs(cfg: Config, params_shape: GRCParams, mesh: Mesh) -> GRCParams:
    """PartitionSpecs of the train params: the model's by its logical names, the rest replicated."""
    shapes, logical = abstract_params(cfg.model, cfg.grc)
    replicated = lambda tree: jax.tree.map(lambda _: PartitionSpec(), tree)  # noqa: E731
    return GRCParams(
        model=param_specs(logical, shapes, mesh),
        head=replicated(params_shape.head),
        lora=replicated(params_shape.lora),
    )


def opt_state_specs(opt_state_shape: Any, params_shape: Any, param_specs: Any) -> Any:
    """PartitionSpecs for an optimizer state: a leaf whose key path ends with a parameter's
    path and whose shape equals that parameter's (AdamW moments, also inside `multi_transform`'s
    per-label states) takes the parameter's spec; everything else (counts, scalars) replicates."""
    by_path = {}
    specs_flat = jax.tree_util.tree_flatten_with_path(
        param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )[0]
    shapes = dict(
        (path_names(p), leaf.shape)
        for p, leaf in jax.tree_util.tree_flatten_with_path(params_shape)[0]
    )
    for path, spec in specs_flat:
        by_path[path_names(path)] = (spec, shapes[path_names(path)])

    def spec_for(path, leaf):
        keys = path_names(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[1] == leaf.shape:
                return hit[0]
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec_for, opt_state_shape)


def state_shardings(cfg: Config, state_shape: TrainState, mesh: Mesh) -> TrainState:
    """NamedShardings for a TrainState: optimizer moments follow their parameters."""
    specs = param_partition_specs(cfg, state_shape.params, mesh)
    opt_specs = opt_state_specs(state_shape.opt_state, state_shape.params, specs)
    to_named = lambda tree: jax.tree.map(  # noqa: E731
        lambda s: NamedSharding(mesh, s), tree, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    return TrainState(
        step=NamedSharding(mesh, PartitionSpec()),
        params=to_named(specs),
        opt_state=to_named(opt_specs),
    )


def create_state(
    cfg: Config, mesh: Mesh, rng: jax.Array, model_params: Any | None = None
) -> tuple[TrainState, TrainState]:
    """A sharded fresh TrainState and its shardings (params are created directly in place)."""

    # `model_params` (an import) is an argument, not a closed-over constant: as a constant, each
    # of its arrays would be embedded in the compiled program (slow to compile, in memory twice).
    def make(model_params):
        params = init_grc_params(cfg, rng, model_params)
        opt_state = make_optimizer(cfg.train, params).init(params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)

    shape = jax.eval_shape(make, model_params)
    shardings = state_shardings(cfg, shape, mesh)
    if model_params is not None:  # placed as the state will hold them, not on one device
        model_params = jax.device_put(model_params, shardings.params.model)
    with activation_sharding(mesh):
        state = jax.jit(make, out_shardings=shardings)(model_params)
    return state, shardings
