"""Train state (a pytree) and its creation, sharded on the mesh by the logical-axis rules."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grc_jax.config import Config
from grc_jax.model import abstract_params, init_params
from grc_jax.sharding import activation_sharding, param_specs
from grc_jax.train.lora import init_lora
from grc_jax.train.losses import init_head_params
from grc_jax.train.optim import make_optimizer


@flax.struct.dataclass
class TrainState:
    step: Any  # int32 scalar (also a ShapeDtypeStruct under eval_shape)
    params: dict[str, Any]  # {"model", "head"} (+ "lora")
    opt_state: Any


def init_train_params(cfg: Config, rng: jax.Array, model_params: Any | None = None) -> dict:
    """Fresh params; `model_params` (e.g. an imported model) replaces the random transformer."""
    r_model, r_head, r_lora = jax.random.split(rng, 3)
    if model_params is None:
        model_params = init_params(cfg.model, cfg.grc, r_model)
    params = {"model": model_params, "head": init_head_params(cfg.grc, cfg.model.d_model, r_head)}
    if cfg.train.lora_rank > 0:
        params["lora"] = init_lora(model_params, cfg.train.lora_rank, cfg.model.scan_layers, r_lora)
    return params


def param_partition_specs(cfg: Config, params_shape: Any, mesh: Mesh) -> Any:
    """PartitionSpecs of the train params: the model's by its logical names, the rest replicated."""
    shapes, logical = abstract_params(cfg.model, cfg.grc)
    specs = {"model": param_specs(logical, shapes, mesh)}
    for key in params_shape:
        if key != "model":
            specs[key] = jax.tree.map(lambda _: PartitionSpec(), params_shape[key])
    return specs


def _dict_path(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def opt_state_specs(opt_state_shape: Any, params_shape: Any, param_specs: Any) -> Any:
    """PartitionSpecs for an optimizer state: a leaf whose dict-key path ends with a parameter's
    path and whose shape equals that parameter's (AdamW moments, also inside `multi_transform`'s
    per-label states) takes the parameter's spec; everything else (counts, scalars) replicates."""
    by_path = {}
    specs_flat = jax.tree_util.tree_flatten_with_path(
        param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )[0]
    shapes = dict(
        (_dict_path(p), leaf.shape)
        for p, leaf in jax.tree_util.tree_flatten_with_path(params_shape)[0]
    )
    for path, spec in specs_flat:
        by_path[_dict_path(path)] = (spec, shapes[_dict_path(path)])

    def spec_for(path, leaf):
        keys = _dict_path(path)
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

    def make():
        params = init_train_params(cfg, rng, model_params)
        opt_state = make_optimizer(cfg.train, params).init(params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)

    shape = jax.eval_shape(make)
    shardings = state_shardings(cfg, shape, mesh)
    with activation_sharding(mesh):
        state = jax.jit(make, out_shardings=shardings)()
    return state, shardings
