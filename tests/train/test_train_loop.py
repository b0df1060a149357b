"""The training loop end to end: bit-identical resume, non-finite stop, checkpoint errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from grc_jax.checkpoints import RunCheckpoints
from grc_jax.core.config import load_config
from grc_jax.core.errors import CheckpointError, NonFiniteLossError
from grc_jax.data.synth import synthesize
from grc_jax.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
    "model.head_dim=16", "model.d_ff=128", "grc.num_latents=4", "data.seq_len=128",
    "data.batch_size=8", "train.log_every=1", "train.eval_every=1000", "train.eval_queries=4",
    "train.warmup_steps=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, seed=0, queries_per_doc=1)
    return out


def _overrides(data_dir, out_dir, name, *extra):
    return [
        *SMALL,
        f"data.train_path={data_dir}/train.jsonl",
        f"data.eval_path={data_dir}/validation.jsonl",
        f"train.output_dir={out_dir}",
        f"train.run_name={name}",
        *extra,
    ]


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/total"] for r in rows}


def _grc(*args, cwd):
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "grc_jax.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


def test_resume_in_new_process_is_bit_identical(data_dir, tmp_path):
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        _overrides(data_dir, tmp_path, "straight", "train.steps=6", "train.checkpoint_every=3"),
    )
    result = train(cfg, quiet=True)
    straight = _losses(tmp_path / "straight")
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]
    # Outputs of a finished run: final eval beside the untrained one, TensorBoard events.
    assert set(result["final"]) == set(result["untrained"])
    assert (tmp_path / "straight/eval/final.json").is_file()
    assert list((tmp_path / "straight/tb").glob("events.out.tfevents.*"))

    args = _overrides(data_dir, tmp_path, "split", "train.steps=6", "train.checkpoint_every=3")
    first = _grc("train", "--config", "configs/tiny.yaml", "--stop-after", "3", *args, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    assert RunCheckpoints(tmp_path / "split/checkpoints", 3).all_steps() == [3]
    second = _grc("train", "--config", "configs/tiny.yaml", *args, cwd=ROOT)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed" in second.stdout
    split = _losses(tmp_path / "split")
    assert sorted(split) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert split[step] == straight[step], (step, split[step], straight[step])
    assert straight[6] < straight[1]


def test_non_finite_update_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    base = _overrides(data_dir, tmp_path, "nan", "train.steps=6", "train.checkpoint_every=1")
    train(load_config(ROOT / "configs/tiny.yaml", base), max_steps=2, quiet=True)
    ckpts = RunCheckpoints(tmp_path / "nan/checkpoints", 3)
    assert ckpts.latest_step() == 2
    ckpts.close()
    # inf itself is refused at load time; 1e39 is finite there but overflows float32 in the step.
    bad = load_config(ROOT / "configs/tiny.yaml", [*base, "train.learning_rate=1e39"])
    with pytest.raises(NonFiniteLossError, match=r"step 3.*last good checkpoint \(step 2\)"):
        train(bad, quiet=True)
    ckpts = RunCheckpoints(tmp_path / "nan/checkpoints", 3)
    assert ckpts.all_steps() == [1, 2]
    good = load_config(ROOT / "configs/tiny.yaml", base)
    from grc_jax.core.sharding import make_mesh
    from grc_jax.train.state import create_state

    state, _ = create_state(good, make_mesh(good.mesh), jax.random.key(0))
    restored, data_state, step = ckpts.restore(None, state)
    ckpts.close()
    assert step == 2 and "parent" in data_state
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))


def test_missing_and_corrupted_checkpoints_are_errors(data_dir, tmp_path):
    base = _overrides(data_dir, tmp_path, "ck", "train.steps=2", "train.checkpoint_every=2")
    cfg = load_config(ROOT / "configs/tiny.yaml", [*base, "train.resume=required"])
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        train(cfg, quiet=True)
    train(load_config(ROOT / "configs/tiny.yaml", base), quiet=True)
    # resume=never refuses to train over existing checkpoints.
    with pytest.raises(ValueError, match="train.resume=never"):
        train(load_config(ROOT / "configs/tiny.yaml", [*base, "train.resume=never"]), quiet=True)
    # Corrupt the saved state: resuming must fail loudly, not start fresh.
    state_dir = tmp_path / "ck/checkpoints/2/state"
    for f in state_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    more = load_config(ROOT / "configs/tiny.yaml", [*base, "train.steps=4"])
    with pytest.raises(CheckpointError, match="cannot be restored"):
        train(more, quiet=True)
    # `grc eval` on a run without checkpoints names the problem.
    result = _grc("eval", str(tmp_path / "nope"), cwd=ROOT)
    assert result.returncode == 2 and "not a run directory" in result.stderr
