"""Mesh construction and the ONE table that maps logical axis names to mesh axes.

Parameters and the main activations carry logical axis names (`("embed", "mlp")`, ...). One rule
table, `LOGICAL_AXIS_RULES`, maps each name to a mesh axis (or a tuple of them, or None), and
`logical_to_spec` resolves a tuple of names to a `PartitionSpec`, refusing specs that would use a
physical axis twice. A dimension that the mapped mesh axes do not divide is replicated instead
(e.g. SmolLM2's 9 heads on a 4-way tensor axis): sharding it would need padding. The training
batch is the exception: `check_batch_sharding` refuses one the data-parallel axes do not divide.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from grc_jax.core.config import Config, MeshConfig
from grc_jax.core.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None

# The single source of truth: logical axis name -> mesh axis / axes / None (replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("latents", None),
    ("layers", None),
    ("projection", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


class ShardingRuleError(ConfigError):
    """The logical-axis rules are inconsistent, or a spec would reuse a mesh axis."""


def rules_dict(
    rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES,
) -> dict[str, tuple[str, ...]]:
    """Validate a rule table and return it as name -> tuple of mesh axes.

    Raises on a logical name listed twice (conflicting rules), an unknown mesh axis, or a rule that
    names the same mesh axis twice.
    """
    table: dict[str, tuple[str, ...]] = {}
    for name, target in rules:
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        if name in table:
            raise ShardingRuleError(
                f"logical axis {name!r} has two rules: {table[name] or None} and {axes or None}"
            )
        for axis in axes:
            if axis not in MESH_AXES:
                raise ShardingRuleError(
                    f"rule for {name!r} names mesh axis {axis!r}; expected one of {MESH_AXES}"
                )
        if len(set(axes)) != len(axes):
            raise ShardingRuleError(f"rule for {name!r} repeats a mesh axis: {axes}")
        table[name] = axes
    return table


_RULES = rules_dict()


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh_shape: Mapping[str, int] | None = None,
    rules: Mapping[str, tuple[str, ...]] = _RULES,
) -> PartitionSpec:
    """Resolve logical axis names to a `PartitionSpec`.

    With `shape` and `mesh_shape`, a dimension not divisible by the product of its mesh axes is
    replicated. Raises `ShardingRuleError` on an unknown name or a mesh axis used twice.
    """
    if shape is not None and len(shape) != len(logical_axes):
        raise ShardingRuleError(
            f"logical axes {tuple(logical_axes)} do not match the array rank "
            f"of shape {tuple(shape)}"
        )
    used: dict[str, str] = {}
    parts: list[Any] = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            parts.append(None)
            continue
        if name not in rules:
            raise ShardingRuleError(
                f"logical axis {name!r} has no rule; known names: {', '.join(sorted(rules))}"
            )
        axes = rules[name]
        if shape is not None and mesh_shape is not None and axes:
            if shape[dim] % math.prod(mesh_shape[a] for a in axes) != 0:
                axes = ()
        for axis in axes:
            if axis in used:
                raise ShardingRuleError(
                    f"logical axes {tuple(logical_axes)}: mesh axis {axis!r} would shard both "
                    f"{used[axis]!r} and {name!r}"
                )
            used[axis] = name
        parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*parts)


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """The mesh axis sizes `cfg` gives on `n_devices` devices (a -1 entry: the rest of them)."""
    cfg.validate("mesh")
    shape = list(cfg.shape)
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known != 0:
            raise ShardingRuleError(
                f"mesh {dict(zip(MESH_AXES, cfg.shape))}: {n_devices} devices are not divisible "
                f"by the fixed axes' product {known}"
            )
        shape[shape.index(-1)] = n_devices // known
    if math.prod(shape) != n_devices:
        raise ShardingRuleError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
            f"but {n_devices} are available"
        )
    return dict(zip(MESH_AXES, shape))


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` over ("data", "fsdp", "tensor"); a -1 entry takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(mesh_shape(cfg, len(devices)).values())
    device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def check_batch_sharding(cfg: Config, n_devices: int) -> None:
    """Refuse a training batch that the mesh cannot split evenly: `data.batch_size` rows are
    sharded over the `data` x `fsdp` axes (`activation_batch`), and so are the rows of each of the
    `train.microbatches` microbatches. An uneven split would silently replicate the batch."""
    sizes = mesh_shape(cfg.mesh, n_devices)
    dp = sizes["data"] * sizes["fsdp"]
    given = {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp}
    axes = " x ".join(
        f"mesh.{a}=" + ("-1 -> " if given[a] == -1 else "") + str(sizes[a])
        for a in ("data", "fsdp")
    )
    where = f"the data-parallel size {dp} ({axes} on {n_devices} devices)"
    batch, micro = cfg.data.batch_size, cfg.train.microbatches
    if batch % dp:
        raise ConfigError(
            f"config key 'data.batch_size': expected a multiple of {where}, got {batch}"
        )
    if batch % (micro * dp):
        raise ConfigError(
            f"config key 'train.microbatches': each of the {micro} microbatches of "
            f"data.batch_size={batch} has {batch // micro} rows, not a multiple of {where}; "
            f"use a divisor of {batch // dp}"
        )


# Activation constraints apply only inside `activation_sharding(mesh)`, so the same model code runs
# unsharded (tests, CPU inference) and sharded (training).
_ACTIVE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("grc_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh) -> Iterator[Mesh]:
    """Within this context, `constrain` pins activations to `mesh` by the rule table."""
    # `jax.set_mesh` also makes the mesh part of jit's trace context: a function traced outside
    # this context is retraced inside it instead of silently reusing the unconstrained trace.
    token = _ACTIVE_MESH.set(mesh)
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _ACTIVE_MESH.reset(token)


def current_mesh() -> Mesh | None:
    """The mesh of the enclosing `activation_sharding` context; None outside one."""
    return _ACTIVE_MESH.get()


def batch_mesh_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes of size > 1 that split the batch's rows (`activation_batch`)."""
    return tuple(a for a in _RULES["activation_batch"] if mesh.shape[a] > 1)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside a mesh context."""
    mesh = _ACTIVE_MESH.get()
    if mesh is None:
        return x
    spec = logical_to_spec(logical_axes, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def param_specs(logical: Any, shapes: Any, mesh: Mesh) -> Any:
    """PartitionSpecs for a parameter pytree, from its logical-name pytree and shape pytree."""
    mesh_shape = dict(mesh.shape)
    return jax.tree.map(
        lambda names, s: logical_to_spec(tuple(names), s.shape, mesh_shape),
        logical,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def param_shardings(logical: Any, shapes: Any, mesh: Mesh) -> Any:
    """`NamedSharding`s for a parameter pytree (see `param_specs`)."""
    specs = param_specs(logical, shapes, mesh)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
