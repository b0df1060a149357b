"""Sharding: the rule resolver, mesh construction, golden parameter specs, sharded == unsharded.

Runs on the 8 simulated CPU devices of conftest.py. The golden files under tests/golden/ are
rewritten only by `make golden` (scripts/update_golden.py); a spec change fails here with a diff.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from grc_jax.core.batch import Rows
from grc_jax.core.config import MeshConfig, load_config
from grc_jax.core.roles import GEN, LATENT, PAD, TEXT
from grc_jax.core.sharding import (
    LOGICAL_AXIS_RULES,
    MESH_AXES,
    ShardingRuleError,
    activation_sharding,
    constrain,
    logical_to_spec,
    make_mesh,
    param_shardings,
    param_specs,
    rules_dict,
)
from grc_jax.model.sharding_report import (
    GOLDEN_CONFIGS,
    GOLDEN_MESHES,
    diff_documents,
    golden_document,
)
from grc_jax.model.transformer import abstract_params, forward, init_params

ROOT = Path(__file__).resolve().parents[2]
GOLDEN_DIR = ROOT / "tests" / "golden"
MESH_IDS = ["x".join(map(str, m)) for m in GOLDEN_MESHES]


def _mesh_shape(data: int = 1, fsdp: int = 1, tensor: int = 1) -> dict[str, int]:
    return {"data": data, "fsdp": fsdp, "tensor": tensor}


# ---------------------------------------------------------------------------------------------
# Rule table and resolver


def test_rule_table_is_valid_and_covers_every_mesh_axis():
    table = rules_dict(LOGICAL_AXIS_RULES)
    assert len(table) == len(LOGICAL_AXIS_RULES)
    used = {axis for axes in table.values() for axis in axes}
    assert used == set(MESH_AXES)


def test_conflicting_rules_raise():
    with pytest.raises(ShardingRuleError, match=r"'heads' has two rules"):
        rules_dict((("heads", "tensor"), ("embed", "fsdp"), ("heads", None)))


def test_rule_naming_unknown_or_repeated_mesh_axis_raises():
    with pytest.raises(ShardingRuleError, match=r"'model'"):
        rules_dict((("heads", "model"),))
    with pytest.raises(ShardingRuleError, match=r"repeats a mesh axis"):
        rules_dict((("batch", ("data", "data")),))


def test_mesh_axis_used_twice_raises_naming_both_logical_names():
    # "heads" and "mlp" both map to "tensor"; both dims are divisible, so both would use it.
    with pytest.raises(ShardingRuleError) as err:
        logical_to_spec(("heads", "mlp"), (4, 8), _mesh_shape(tensor=2))
    msg = str(err.value)
    assert "'heads'" in msg and "'mlp'" in msg and "'tensor'" in msg
    # Without shapes the same conflict is found.
    with pytest.raises(ShardingRuleError, match=r"'heads'.*'mlp'"):
        logical_to_spec(("heads", "mlp"))
    # A multi-axis rule overlapping a single-axis one.
    rules = rules_dict((("batch", ("data", "fsdp")), ("embed", "fsdp")))
    with pytest.raises(ShardingRuleError, match=r"'fsdp'.*'batch'.*'embed'"):
        logical_to_spec(("batch", "embed"), rules=rules)


def test_unknown_logical_name_raises():
    with pytest.raises(ShardingRuleError, match=r"'hedas' has no rule"):
        logical_to_spec(("embed", "hedas"))


def test_rank_mismatch_raises():
    with pytest.raises(ShardingRuleError, match=r"do not match the array rank"):
        logical_to_spec(("embed", "mlp"), (128,), _mesh_shape(fsdp=2))


def test_resolves_names_to_mesh_axes():
    spec = logical_to_spec(
        ("activation_batch", None, "activation_heads", "head_dim"),
        (8, 16, 4, 32),
        _mesh_shape(data=2, fsdp=2, tensor=2),
    )
    assert spec == PartitionSpec(("data", "fsdp"), None, "tensor", None)


def test_non_divisible_dim_is_replicated():
    mesh4 = _mesh_shape(fsdp=2, tensor=4)
    # SmolLM2: 9 heads (and 3 kv heads) on a 4-way tensor axis.
    assert logical_to_spec(("embed", "heads", "head_dim"), (576, 9, 64), mesh4) == PartitionSpec(
        "fsdp", None, None
    )
    assert logical_to_spec(("embed", "heads", "head_dim"), (576, 16, 64), mesh4) == PartitionSpec(
        "fsdp", "tensor", None
    )
    # A multi-axis rule is replicated as a whole when the product does not divide the dim.
    mesh24 = _mesh_shape(data=2, fsdp=4)
    assert logical_to_spec(("activation_batch",), (4,), mesh24) == PartitionSpec(None)
    assert logical_to_spec(("activation_batch",), (8,), mesh24) == PartitionSpec(("data", "fsdp"))
    # A replicated dim leaves its mesh axis free: no conflict with another dim that uses it.
    assert logical_to_spec(("heads", "mlp"), (9, 8), mesh4) == PartitionSpec(None, "tensor")


# ---------------------------------------------------------------------------------------------
# Mesh construction


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (MeshConfig(), (8, 1, 1)),
        (MeshConfig(data=-1, fsdp=2, tensor=2), (2, 2, 2)),
        (MeshConfig(data=1, fsdp=-1, tensor=1), (1, 8, 1)),
        (MeshConfig(data=2, fsdp=1, tensor=-1), (2, 1, 4)),
        (MeshConfig(data=2, fsdp=4, tensor=1), (2, 4, 1)),
    ],
)
def test_make_mesh_auto_fills(devices, cfg, expected):
    mesh = make_mesh(cfg)
    assert mesh.axis_names == MESH_AXES
    assert tuple(mesh.shape[a] for a in MESH_AXES) == expected
    assert mesh.devices.size == len(devices)


def test_make_mesh_on_a_subset_of_devices(devices):
    mesh = make_mesh(MeshConfig(data=-1, fsdp=2, tensor=1), devices[:4])
    assert dict(mesh.shape) == _mesh_shape(data=2, fsdp=2)


def test_make_mesh_impossible_shapes_raise(devices):
    with pytest.raises(ShardingRuleError, match=r"8 devices are not divisible by .* 3"):
        make_mesh(MeshConfig(data=3, fsdp=-1, tensor=1))
    with pytest.raises(ShardingRuleError, match=r"needs 4 devices, but 8 are available"):
        make_mesh(MeshConfig(data=2, fsdp=2, tensor=1))
    with pytest.raises(ShardingRuleError, match=r"needs 16 devices, but 8 are available"):
        make_mesh(MeshConfig(data=2, fsdp=4, tensor=2))


# ---------------------------------------------------------------------------------------------
# Activation constraints


def _constrained(x):
    return constrain(x * 2.0, ("activation_batch", "activation_length", "activation_embed"))


def _jaxpr(x) -> str:
    # A fresh function each time: traces are cached per function, blind to the context.
    return str(jax.make_jaxpr(lambda y: _constrained(y))(x))


def test_constrain_is_a_no_op_outside_activation_sharding(devices):
    x = jnp.ones((8, 4, 16))
    assert constrain(x, ("activation_batch", "activation_length", "activation_embed")) is x
    assert "sharding_constraint" not in _jaxpr(x)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with activation_sharding(mesh):
        jaxpr = _jaxpr(x)
        out = jax.jit(lambda y: _constrained(y))(x)
    assert "sharding_constraint" in jaxpr
    assert out.sharding.is_equivalent_to(
        NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, None)), x.ndim
    )
    # The context is gone again afterwards.
    assert "sharding_constraint" not in _jaxpr(x)


def test_jit_traced_outside_activation_sharding_is_retraced_inside(devices):
    f = jax.jit(_constrained)
    x = jnp.ones((8, 4, 16))
    f(x)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with activation_sharding(mesh):
        out = f(x)
    assert out.sharding.is_equivalent_to(
        NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, None)), x.ndim
    )


# ---------------------------------------------------------------------------------------------
# Golden parameter specs (eval_shape only: nothing is allocated)


@pytest.mark.parametrize("name", GOLDEN_CONFIGS)
def test_param_specs_match_golden(name, devices, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = GOLDEN_DIR / f"param_specs_{name}.json"
    assert path.exists(), f"{path} is missing: run `make golden` and review the new file"
    golden = json.loads(path.read_text())
    diffs = diff_documents(golden, golden_document(f"configs/{name}.yaml"))
    assert not diffs, (
        f"{len(diffs)} difference(s) from {path.relative_to(ROOT)}; if intended, run `make golden` "
        "and review the diff:\n  " + "\n  ".join(diffs)
    )


def test_golden_diff_names_the_changed_parameter():
    path = GOLDEN_DIR / "param_specs_tiny.json"
    golden = json.loads(path.read_text())
    changed = copy.deepcopy(golden)
    changed["params"]["layers_1/attn/q/kernel"]["specs"]["1x2x4"] = ["fsdp", None, None]
    del changed["params"]["latents"]
    diffs = diff_documents(golden, changed)
    assert diffs == [
        "latents: in the golden file but no longer a parameter",
        "layers_1/attn/q/kernel: spec on mesh 1x2x4 golden ['fsdp', 'tensor', None], "
        "now ['fsdp', None, None]",
    ]
    assert diff_documents(golden, golden) == []


def test_golden_tables_sanity():
    """What a reviewer checks by eye in the golden files, stated once as code."""
    smol = json.loads((GOLDEN_DIR / "param_specs_smollm2_135m.json").read_text())["params"]
    llama = json.loads((GOLDEN_DIR / "param_specs_llama3_8b.json").read_text())["params"]
    # embed dim on fsdp, heads on tensor, leading layer axis replicated.
    assert llama["layers/attn/q/kernel"]["specs"]["2x2x2"] == [None, "fsdp", "tensor", None]
    assert llama["lm_head/kernel"]["specs"]["1x2x4"] == ["fsdp", "tensor"]
    # SmolLM2: 9 heads / 3 kv heads do not divide a 2- or 4-way tensor axis: replicated.
    for p in ("q", "k", "v"):
        assert smol[f"layers/attn/{p}/kernel"]["specs"]["1x2x4"] == [None, "fsdp", None, None]
    assert smol["layers/attn/o/kernel"]["specs"]["2x2x2"] == [None, None, None, "fsdp"]
    assert smol["layers/mlp/gate/kernel"]["specs"]["1x2x4"] == [None, "fsdp", "tensor"]


# ---------------------------------------------------------------------------------------------
# Sharded forward == unsharded forward


def _tiny_model(**overrides):
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    return dataclasses.replace(cfg.model, n_layers=2, **overrides), cfg.grc


def _batch(cfg, grc, batch: int = 8, length: int = 16, seed: int = 0) -> dict[str, jax.Array]:
    """Packed rows: example 1 = text + latents (block 0) then gen (block 1); example 2; padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (batch, length))
    seg = np.zeros((batch, length), np.int32)
    blk = np.zeros((batch, length), np.int32)
    roles = np.full((batch, length), PAD, np.int32)
    pos = np.zeros((batch, length), np.int32)
    for b in range(batch):
        n_text, n_lat, n_gen = 3 + b % 3, 2, 4
        n1 = n_text + n_lat + n_gen
        n2 = min(length - n1 - b % 2, 4)  # rows with odd b end in padding
        seg[b, :n1], seg[b, n1 : n1 + n2] = 1, 2
        blk[b, n_text + n_lat : n1] = 1
        roles[b, :n_text] = TEXT
        roles[b, n_text : n_text + n_lat] = LATENT
        roles[b, n_text + n_lat : n1] = GEN
        roles[b, n1 : n1 + n2] = TEXT
        tokens[b, n_text : n_text + n_lat] = rng.integers(0, grc.num_latents, n_lat)
        pos[b, :n1] = np.arange(n1)
        pos[b, n1 : n1 + n2] = np.arange(n2)
    arrays = Rows(tokens=tokens, segment_ids=seg, block_ids=blk, roles=roles, positions=pos)
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.int32), arrays)


def _sharded_forward(params, cfg, grc, batch, mesh):
    """Place params by the rule table and the batch on ("data", "fsdp"); run jit in the context."""
    shapes = jax.eval_shape(lambda: params)
    _, logical = abstract_params(cfg, grc)
    sharded_params = jax.device_put(params, param_shardings(logical, shapes, mesh))
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    sharded_batch = jax.device_put(batch, batch_sharding)
    # A fresh jit per mesh: jit's cache does not see the activation_sharding context.
    with activation_sharding(mesh):
        out = jax.jit(lambda p, b: forward(p, cfg, grc, b))(sharded_params, sharded_batch)
    return sharded_params, sharded_batch, out


def _assert_close(sharded, unsharded):
    for field in ("logits", "hidden"):
        np.testing.assert_allclose(
            np.asarray(getattr(sharded, field)),
            np.asarray(getattr(unsharded, field)),
            rtol=1e-5,
            atol=1e-5,
            err_msg=f"sharded {field} differ from the unsharded forward",
        )


@pytest.fixture(scope="module")
def tiny_reference():
    cfg, grc = _tiny_model()
    params = init_params(cfg, grc, jax.random.key(0))
    batch = _batch(cfg, grc)
    out = jax.jit(lambda p, b: forward(p, cfg, grc, b))(params, batch)
    return cfg, grc, params, batch, out


@pytest.mark.parametrize("mesh_shape", GOLDEN_MESHES, ids=MESH_IDS)
def test_sharded_forward_matches_unsharded(mesh_shape, tiny_reference, devices):
    cfg, grc, params, batch, expected = tiny_reference
    data, fsdp, tensor = mesh_shape
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    sharded_params, sharded_batch, out = _sharded_forward(params, cfg, grc, batch, mesh)

    # The placement really shards: exact per-device shard shapes from the mesh sizes.
    gate = sharded_params["layers_0"]["mlp"]["gate"]["kernel"]
    assert gate.sharding.spec == PartitionSpec("fsdp", "tensor")
    assert gate.addressable_shards[0].data.shape == (cfg.d_model // fsdp, cfg.d_ff // tensor)
    q = sharded_params["layers_1"]["attn"]["q"]["kernel"]
    assert q.addressable_shards[0].data.shape == (
        cfg.d_model // fsdp,
        cfg.n_heads // tensor,
        cfg.head_dim,
    )
    per_device_elems = sum(
        x.addressable_shards[0].data.size for x in jax.tree.leaves(sharded_params)
    )
    total = sum(x.size for x in jax.tree.leaves(params))
    if fsdp * tensor > 1:
        assert per_device_elems < total, "no parameter is sharded on this mesh"
    tokens = sharded_batch.tokens
    assert tokens.addressable_shards[0].data.shape == (8 // (data * fsdp), tokens.shape[1])
    # The activation constraints took effect: logits leave batch- and vocab-sharded.
    assert out.logits.sharding.is_equivalent_to(
        NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor")), 3
    )
    _assert_close(out, expected)


def test_scanned_params_have_a_replicated_layer_axis_and_match_unsharded(devices):
    cfg, grc = _tiny_model(scan_layers=True)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    shapes, logical = abstract_params(cfg, grc)
    specs = param_specs(logical, shapes, mesh)
    layer_specs = jax.tree.leaves(specs["layers"], is_leaf=lambda x: isinstance(x, PartitionSpec))
    layer_names = jax.tree.leaves(logical["layers"], is_leaf=lambda x: isinstance(x, PartitionSpec))
    layer_shapes = jax.tree.leaves(shapes["layers"])
    assert len(layer_specs) == 9  # attn q/k/v/o, mlp gate/up/down, 2 norms
    for names, spec, s in zip(layer_names, layer_specs, layer_shapes, strict=True):
        assert names[0] == "layers" and s.shape[0] == cfg.n_layers
        assert spec[0] is None, f"layer axis of {names} is sharded: {spec}"
        assert len(spec) == len(s.shape)
    assert specs["layers"]["mlp"]["down"]["kernel"] == PartitionSpec(None, "tensor", "fsdp")

    params = init_params(cfg, grc, jax.random.key(1))
    batch = _batch(cfg, grc, seed=1)
    expected = forward(params, cfg, grc, batch)
    sharded_params, _, out = _sharded_forward(params, cfg, grc, batch, mesh)
    up = sharded_params["layers"]["mlp"]["up"]["kernel"]
    assert up.addressable_shards[0].data.shape == (cfg.n_layers, cfg.d_model // 2, cfg.d_ff // 2)
    assert math.prod(up.addressable_shards[0].data.shape) < up.size
    _assert_close(out, expected)


@pytest.mark.parametrize(
    "shape, needle",
    [((-1, 0, 1), "'mesh.fsdp': expected a positive integer or -1"),
     ((-1, -1, 1), "at most one axis set to -1"),
     ((-2, 1, 1), "'mesh.data': expected a positive integer or -1")],
)  # fmt: skip
def test_make_mesh_rejects_invalid_config(devices, shape, needle):
    from grc_jax.core.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(needle)):
        make_mesh(MeshConfig(*shape))
