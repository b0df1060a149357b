"""`grc aot`: topology names, and (with the libtpu wheel) a train step compiled for a v5p-128."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grc_jax.train.aot import TopologyError, topology_name

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "model.n_layers=2", "model.d_model=256", "model.n_heads=4", "model.n_kv_heads=2",
    "model.head_dim=64", "model.d_ff=512", "data.seq_len=256", "data.batch_size=64",
]  # fmt: skip


def test_topology_names():
    assert topology_name("v5p-128") == ("v5p", "v5p:4x4x4")  # 64 chips of 2 TensorCores
    assert topology_name("v5p-8") == ("v5p", "v5p:2x2x1")
    assert topology_name("v4-32") == ("v4", "v4:2x2x4")
    assert topology_name("v5litepod-16") == ("v5litepod", "v5e:4x4")
    assert topology_name("v6e-64") == ("v6e", "v6e:8x8")
    assert topology_name("v5p:4x4x8") == ("v5p", "v5p:4x4x8")
    with pytest.raises(TopologyError, match="no standard v5p slice of 3 chips"):
        topology_name("v5p-6")
    with pytest.raises(TopologyError, match="expected an accelerator type"):
        topology_name("tpu-128")


def _aot(tmp_path, name, *overrides):
    out = tmp_path / f"{name}.json"
    env = dict(os.environ)
    env.pop("JAX_PLATFORMS", None)
    r = subprocess.run(
        [sys.executable, "-m", "grc_jax.cli", "aot", "--config", "configs/tiny.yaml",
         "--topology", "v5p-128", "--json", str(out), *SMALL, *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "per-device memory" in r.stdout and "fits" in r.stdout, r.stdout
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="needs the libtpu wheel (jax[tpu])"
)
def test_aot_v5p_128_reports_per_device_memory(tmp_path):
    data = _aot(tmp_path, "dp", "mesh.data=-1", "mesh.fsdp=1")
    assert data["devices"] == 64 and data["topology"] == "v5p:4x4x4"
    assert data["mesh"] == {"data": 64, "fsdp": 1, "tensor": 1}
    per = data["per_device_bytes"]
    assert 0 < per["train_state"] <= per["arguments"] < per["total"] < data["hbm_per_device_bytes"]
    # fp32 params plus two AdamW moments, replicated on every device under pure data parallel.
    assert per["train_state"] >= 3 * 4 * data["parameters"]
    # FSDP over 8 devices shards the state: about an eighth of it per device.
    fsdp = _aot(tmp_path, "fsdp", "mesh.data=-1", "mesh.fsdp=8")
    assert fsdp["mesh"] == {"data": 8, "fsdp": 8, "tensor": 1}
    assert fsdp["per_device_bytes"]["train_state"] < per["train_state"] / 4
