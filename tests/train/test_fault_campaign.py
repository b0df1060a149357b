"""The fault campaign of `scripts/fault_campaign.py`, small: one SIGKILL at each kind of point
(while stepping, while Orbax writes a checkpoint, right after a step directory is committed), each
killed run resumed to the end and compared bit for bit with an uninterrupted run."""

import importlib.util
from pathlib import Path

import pytest

from grc_jax.data.synth import synthesize

ROOT = Path(__file__).resolve().parents[2]


def _campaign():
    spec = importlib.util.spec_from_file_location(
        "fault_campaign", ROOT / "scripts" / "fault_campaign.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # long: `make test-all` (README, Tests)
def test_kill_at_step_save_and_commit_then_resume_bit_exact(tmp_path):
    campaign = _campaign()
    data = tmp_path / "synth"
    synthesize(data, seed=0, queries_per_doc=1)
    report = campaign.run_kills(3, data, tmp_path, steps=16, seed=0)
    kinds = [r["kill"] for r in report["runs"]]
    assert kinds == ["step", "save", "commit"]
    for r in report["runs"]:
        assert r["bit_exact"], r
        assert r["metrics_no_duplicates"] and r["metrics_equal"], r
    # The `commit` kill came after a step directory appeared.
    assert report["runs"][2]["checkpoints_at_kill"]
