"""Two processes x 4 CPU devices (jax.distributed over gloo on 127.0.0.1) train exactly like one
process with 8 devices, write one set of outputs, and resume from the checkpoint they wrote."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grc_jax.checkpoints import RunCheckpoints
from grc_jax.core.config import load_config
from grc_jax.core.distributed import DistributedConfigError, Plan, plan
from grc_jax.data.synth import synthesize
from grc_jax.train.loop import train
from grc_jax.train.run_lock import RunLock
from tests.helpers import TINY_MODEL

ROOT = Path(__file__).resolve().parents[2]
# A smaller model than test_train_loop's SMALL: two processes share this machine's two cores.
TINY = [
    *TINY_MODEL, "train.log_every=1", "train.eval_every=1000", "train.warmup_steps=2",
    "train.steps=5", "train.checkpoint_every=3",
]  # fmt: skip
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # as conftest sets for the 1-process run
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    return env


def _start_two_processes(overrides: list[str], *extra: str) -> list[subprocess.Popen]:
    """`grc train` as processes 0 and 1 of 2, with 4 CPU devices each."""
    coordinator = f"127.0.0.1:{_free_port()}"
    distributed = ["--coordinator", coordinator, "--num-processes", "2"]
    command = [sys.executable, "-m", "grc_jax.cli", "train", "--config", "configs/tiny.yaml"]
    return [
        subprocess.Popen(
            [*command, *distributed, "--process-id", str(i), *extra, *overrides],
            cwd=ROOT,
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    """Wait for both processes (killing them on timeout); their stdouts, or the test fails with
    both processes' output."""
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT_S))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outs = [p.communicate() for p in procs]
        pytest.fail(_report("timed out", procs, outs))
    if any(p.returncode != 0 for p in procs):
        pytest.fail(_report("failed", procs, outs))
    return [o[0] for o in outs]


def _train_two_processes(overrides: list[str], *extra: str) -> list[str]:
    return _finish(_start_two_processes(overrides, *extra))


def _report(what: str, procs, outs) -> str:
    parts = [f"two-process training {what}"]
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        parts.append(f"--- process {i} (exit {p.returncode}) stdout:\n{out[-2000:]}")
        parts.append(f"--- process {i} stderr:\n{err[-4000:]}")
    return "\n".join(parts)


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/total"] for r in rows}


@pytest.mark.slow  # long: `make test-all` (README, Tests)
def test_two_processes_match_one_process_and_resume(tmp_path):
    data = tmp_path / "data"
    synthesize(data, seed=0, queries_per_doc=1)

    def overrides(name):
        return [*TINY, f"data.train_path={data}/train.jsonl",
                f"data.eval_path={data}/validation.jsonl", f"train.output_dir={tmp_path}",
                f"train.run_name={name}"]  # fmt: skip

    # Reference: this pytest process, 8 CPU devices (conftest), 5 steps straight.
    train(load_config(ROOT / "configs/tiny.yaml", overrides("one")), quiet=True)
    one = _losses(tmp_path / "one")
    assert sorted(one) == [1, 2, 3, 4, 5]

    # Two processes stop after step 3 (a checkpoint, as a preemption would leave) ...
    outs = _train_two_processes(overrides("two"), "--stop-after", "3")
    assert "run directory" in outs[0] and "run directory" not in outs[1]  # process 0 logs
    assert "process 1/2: 4 local of 8 cpu devices" in outs[1]
    two = tmp_path / "two"
    assert RunCheckpoints(two / "checkpoints", 3).all_steps() == [3]
    assert sorted(_losses(two)) == [1, 2, 3]  # one metrics.jsonl, written once per step
    assert (two / "eval/untrained.json").is_file()
    # ... and a second launch of both resumes from that checkpoint and finishes the run.
    outs = _train_two_processes(overrides("two"))
    assert "resumed" in outs[0] and "resumed" not in outs[1]
    assert (two / "eval/final.json").is_file()
    assert len(list((two / "tb").glob("events.out.tfevents.*"))) >= 1

    losses = _losses(two)
    assert sorted(losses) == [1, 2, 3, 4, 5]
    for step in range(1, 6):
        assert abs(losses[step] - one[step]) <= 1e-5, (step, losses[step], one[step])
    assert losses[5] < losses[1]


@pytest.mark.slow  # long: `make test-all` (README, Tests)
def test_sigterm_to_one_process_checkpoints_all_at_a_common_step(tmp_path):
    """A preemption notice (SIGTERM) to any process: all agree on the next step, save it, exit."""
    data = tmp_path / "data"
    synthesize(data, seed=0, queries_per_doc=1)
    run = tmp_path / "pre"
    overrides = [*TINY, "train.steps=200", "train.checkpoint_every=100",
                 f"data.train_path={data}/train.jsonl", f"data.eval_path={data}/validation.jsonl",
                 f"train.output_dir={tmp_path}", "train.run_name=pre"]  # fmt: skip
    procs = _start_two_processes(overrides)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT_S
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outs = _finish(procs)
    steps = RunCheckpoints(run / "checkpoints", 3).all_steps()
    assert len(steps) == 1 and 1 <= steps[0] < 100, steps
    assert f"preemption notice: saved checkpoint {steps[0]}, stopping" in outs[0]
    assert sorted(_losses(run)) == list(range(1, steps[0] + 1))


def test_a_run_locked_elsewhere_stops_every_process(tmp_path):
    """Only process 0 takes the run lock; when it cannot, process 1 stops too (no hang)."""
    data = tmp_path / "data"
    synthesize(data, seed=0, queries_per_doc=1)
    overrides = [*TINY, f"data.train_path={data}/train.jsonl",
                 f"data.eval_path={data}/validation.jsonl", f"train.output_dir={tmp_path}",
                 "train.run_name=busy"]  # fmt: skip
    with RunLock(tmp_path / "busy"):
        procs = _start_two_processes(overrides)
        try:
            outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(_report("timed out", procs, [p.communicate() for p in procs]))
    assert [p.returncode for p in procs] == [2, 2], _report("exited", procs, outs)
    assert f"pid {os.getpid()}" in outs[0][1]  # process 0 names the holder
    assert "process 0 could not lock it" in outs[1][1]
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == [".lock"]


def test_plan_sources_and_errors():
    assert plan(environ={}).mode == "single"
    assert plan(environ={}, enabled=False).mode == "single"
    assert plan("10.0.0.1:1234", 4, 2, environ={}) == Plan(
        "explicit", "10.0.0.1:1234", 4, 2, "flags"
    )
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert plan(environ=env) == Plan("explicit", "h:1", 2, 1, "environment")
    assert plan("h:2", 3, 0, environ=env).coordinator == "h:2"  # flags win over the environment
    assert plan(environ={"TPU_WORKER_HOSTNAMES": "a,b"}).mode == "tpu"
    assert plan("h:1", 1, 0, environ={}).mode == "single"
    with pytest.raises(DistributedConfigError, match="missing --num-processes, --process-id"):
        plan("h:1", environ={})
    with pytest.raises(DistributedConfigError, match="0 <= process_id < num_processes"):
        plan("h:1", 2, 2, environ={})
    with pytest.raises(DistributedConfigError, match="HOST:PORT"):
        plan("localhost", 2, 0, environ={})
    with pytest.raises(DistributedConfigError, match="JAX_NUM_PROCESSES must be an integer"):
        plan(environ={"JAX_NUM_PROCESSES": "two"})


def test_tpu_vm_detection_reads_the_pci_bus(tmp_path, monkeypatch):
    from grc_jax.core import distributed

    (tmp_path / "0000:00:04.0").mkdir()
    (tmp_path / "0000:00:04.0/vendor").write_text("0x8086\n")
    monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: object())
    assert not distributed.on_tpu_vm({}, str(tmp_path))
    (tmp_path / "0000:00:05.0").mkdir()
    (tmp_path / "0000:00:05.0/vendor").write_text("0x1ae0\n")  # a TPU chip
    assert distributed.on_tpu_vm({}, str(tmp_path))
    monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: None)
    assert not distributed.on_tpu_vm({}, str(tmp_path))  # no libtpu: JAX could not use it
