"""`grc aot`: compile the train step ahead of time for a TPU slice, without TPU hardware.

`jax.experimental.topologies` builds compile-only devices of a TPU topology from the libtpu wheel
(`pip install libtpu`, or `jax[tpu]`); the train step is then lowered on abstract (shape-only)
state and batch with the run's real shardings, and XLA's per-device memory analysis tells whether
a config fits a slice before the slice is rented.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
from jax.experimental import topologies

from grc_jax.core.errors import UsageError
from grc_jax.core.sharding import activation_sharding, check_batch_sharding, make_mesh
from grc_jax.data.pipeline import BatchBuilder, slots_per_row
from grc_jax.model.params import init_grc_params
from grc_jax.train.optim import make_optimizer
from grc_jax.train.state import TrainState, state_shardings
from grc_jax.train.step import batch_shardings, make_train_step

# High-bandwidth memory per chip, GiB (Cloud TPU system architecture pages).
HBM_GIB = {"v4": 32, "v5p": 95, "v5litepod": 16, "v5e": 16, "v6e": 32}

# Chips of a slice laid out as the torus/mesh TPUs are built with (3-D for v4/v5p, 2-D for e).
_SHAPES_3D = {
    4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
    512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16",
}  # fmt: skip
_SHAPES_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}


class TopologyError(UsageError):
    """A topology name this module cannot map to a TPU generation and chip layout."""


def topology_name(accelerator: str) -> tuple[str, str]:
    """`v5p-128` -> (`v5p`, `v5p:4x4x4`); a `gen:AxBxC` name is returned as it is.

    v4/v5p types count TensorCores (two per chip); v5e (v5litepod) and v6e count chips.
    """
    m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e):(\d+(x\d+)+)", accelerator)
    if m:
        return m.group(1), accelerator
    m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", accelerator)
    if not m:
        raise TopologyError(
            f"--topology {accelerator!r}: expected an accelerator type such as v5p-128, v4-32, "
            "v5litepod-16, v6e-64, or a topology such as v5p:4x4x4"
        )
    gen, n = m.group(1), int(m.group(2))
    chips = n // 2 if gen in ("v4", "v5p") else n
    shapes = _SHAPES_3D if gen in ("v4", "v5p") else _SHAPES_2D
    if chips not in shapes:
        raise TopologyError(
            f"--topology {accelerator!r}: no standard {gen} slice of {chips} chips; "
            f"give the shape instead, e.g. {gen}:{next(iter(shapes.values()))}"
        )
    # libtpu names v5e "v5e" in topology strings.
    return gen, f"{'v5e' if gen == 'v5litepod' else gen}:{shapes[chips]}"


def abstract_batch(cfg) -> Any:
    """Shapes and dtypes of one global training batch (from the pipeline's own batch builder)."""
    # One empty row has every field with its per-row shape and dtype; the batch stacks B of them.
    one_row = BatchBuilder(1, cfg.data.seq_len, slots_per_row(cfg), 1, 0).finish()
    return jax.tree.map(
        lambda v: jax.ShapeDtypeStruct((cfg.data.batch_size, *v.shape[1:]), v.dtype), one_row
    )


def _jitted(step: Any) -> Any:
    """The jitted train step inside `make_train_step`'s wrapper (exposed as `.jitted`)."""
    return step.jitted


def compile_train_step(cfg, topology: str) -> dict[str, Any]:
    """Compile `cfg`'s train step for `topology` (e.g. v5p-128); per-device memory in bytes."""
    gen, name = topology_name(topology)
    try:
        topo = topologies.get_topology_desc(topology_name=name, platform="tpu")
    except Exception as e:  # no libtpu, or a topology libtpu rejects
        raise TopologyError(
            f"cannot build TPU topology {name!r} ({type(e).__name__}: {e}); `grc aot` needs the "
            "libtpu wheel: pip install 'jax[tpu]' (or libtpu)"
        ) from e
    devices = list(topo.devices)
    mesh = make_mesh(cfg.mesh, devices)
    check_batch_sharding(cfg, len(devices))

    def make():
        params = init_grc_params(cfg, jax.random.key(0))
        opt_state = make_optimizer(cfg.train, params).init(params)
        return TrainState(step=jax.numpy.zeros((), "int32"), params=params, opt_state=opt_state)

    shape = jax.eval_shape(make)
    shardings = state_shardings(cfg, shape, mesh)
    state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shape, shardings
    )
    batch_shape = abstract_batch(cfg)
    bsh = batch_shardings(batch_shape, mesh)
    batch = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), batch_shape, bsh
    )
    jitted = _jitted(make_train_step(cfg, mesh, shardings, bsh))
    with activation_sharding(mesh):
        compiled = jitted.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    state_bytes = sum(
        math.prod(s.sharding.shard_shape(s.shape)) * s.dtype.itemsize
        for s in jax.tree.leaves(state)
    )
    param_count = sum(math.prod(s.shape) for s in jax.tree.leaves(shape.params))
    total = (
        mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes
    )  # fmt: skip
    return {
        "topology": name,
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape),
        "parameters": param_count,
        "per_device_bytes": {
            "train_state": state_bytes,
            "arguments": mem.argument_size_in_bytes,
            "outputs": mem.output_size_in_bytes,
            "aliased": mem.alias_size_in_bytes,
            "temporaries": mem.temp_size_in_bytes,
            "code": mem.generated_code_size_in_bytes,
            "total": total,
        },
        "hbm_per_device_bytes": HBM_GIB[gen] * 2**30,
    }


def report(result: dict[str, Any]) -> str:
    gib = lambda b: f"{b / 2**30:10.3f} GiB"  # noqa: E731
    per = result["per_device_bytes"]
    lines = [
        f"train step compiled for {result['topology']}: {result['devices']} x "
        f"{result['device_kind']}, mesh {result['mesh']}, {result['parameters']:,} parameters",
        "per-device memory:",
    ]
    lines += [f"  {k:12s} {gib(v)}" for k, v in per.items()]
    hbm = result["hbm_per_device_bytes"]
    verdict = "fits" if per["total"] <= hbm else "does NOT fit"
    lines.append(f"  {'HBM':12s} {gib(hbm)}  -> {verdict} ({100 * per['total'] / hbm:.1f}%)")
    return "\n".join(lines)
