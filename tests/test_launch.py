"""`launch/tpu_run.sh`: the dry run for a v5p-64, early failures, and run/status/stop against a
stub `gcloud` that plays a one-worker TPU on this machine (no cloud access needed)."""

import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch/tpu_run.sh"
POD = ["--tpu", "grc-pod", "--zone", "us-east5-a", "--project", "my-proj"]
G = "gcloud compute tpus tpu-vm"
WHERE = "--zone=us-east5-a --project=my-proj"

# A stand-in for gcloud: `describe` reports $FAKE_STATE/$FAKE_TYPE, `ssh` runs the command with
# bash in $FAKE_HOME (one worker), `scp` copies with TPU:path meaning $FAKE_HOME/path. Every call
# is logged to $FAKE_HOME/../calls.jsonl.
STUB = textwrap.dedent(
    """\
    import json, os, shutil, subprocess, sys
    from pathlib import Path
    home = Path(os.environ["FAKE_HOME"])
    args = sys.argv[1:]
    with open(home.parent / "calls.jsonl", "a") as f:
        f.write(json.dumps(args) + "\\n")
    verb = args[3]
    if verb == "describe":
        print(os.environ["FAKE_STATE"] + "\\t" + os.environ["FAKE_TYPE"])
    elif verb == "ssh":
        command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
        sys.exit(subprocess.run(["bash", "-c", command], cwd=home).returncode)
    elif verb == "scp":
        src, dst = [a for a in args[4:] if not a.startswith("--")]
        where = lambda p: home / p.split(":", 1)[1] if p.startswith("grc-pod:") else Path(p)
        shutil.copy(where(src), where(dst))
    """
)


def _sh(*args, env=None, cwd=ROOT):
    return subprocess.run(
        [str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def _commands(out: str) -> list[list[str]]:
    return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


def test_dry_run_v5p_64_prints_every_command():
    job = ["--config", "configs/tiny.yaml", "--run-name", "pod-test"]
    job += ["--output-dir", "gs://my-bucket/runs", "--env", "A=b c", "--dry-run", "--"]
    job += ["train.steps=1000", "data.train_path=/data/train-*.arrayrecord"]
    r = _sh("run", *POD, "--accelerator", "v5p-64", *job)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if not line.startswith("#")]
    tarball = (os.environ.get("TMPDIR") or "/tmp") + "/grc-jax-src-grc-pod.tgz"
    assert lines[0] == f"{G} describe grc-pod {WHERE} --format='value(state,acceleratorType)'"
    assert lines[1] == (
        f"cd {ROOT} && git ls-files -z --cached --others --exclude-standard | "
        f"tar --null --ignore-failed-read -T - -czf {tarball}"
    )
    assert lines[2].startswith(f"{G} scp ") and lines[2].endswith(
        f"grc-pod:grc-jax-src.tgz {WHERE} --worker=all"
    )
    ssh = f"{G} ssh grc-pod {WHERE} --worker=all --command="
    assert (
        lines[3]
        == ssh + "'mkdir -p grc-jax && tar -xzf grc-jax-src.tgz -C grc-jax && rm grc-jax-src.tgz'"
    )
    assert lines[4].startswith(ssh) and "gcsfuse" in lines[4]  # installs gcsfuse for gs://
    assert lines[4].endswith(
        "cd grc-jax && ([ -x .venv/bin/python ] || python3 -m venv .venv) && .venv/bin/pip "
        'install -q -U pip && .venv/bin/pip install -q -c constraints.txt "jax[tpu]" -e .\''
    )
    assert lines[5].startswith(
        ssh + "'mkdir -p /tmp/gcs/my-bucket && (mountpoint -q /tmp/gcs/my-bucket || gcsfuse "
        "--implicit-dirs my-bucket /tmp/gcs/my-bucket) && cd grc-jax && mkdir -p logs && "
    )
    assert (
        'nohup env PYTHONUNBUFFERED=1 "A=b c" .venv/bin/python -m grc_jax.cli train --config '
        "configs/tiny.yaml train.run_name=pod-test train.output_dir=/tmp/gcs/my-bucket/runs "
        'train.steps=1000 "data.train_path=/data/train-*.arrayrecord" >> logs/train.log 2>&1 '
        "< /dev/null & echo $! > logs/train.pid" in lines[5]
    )
    assert len(lines) == 6
    # No --coordinator: on the pod, every worker's jax.distributed finds the others itself.
    assert "--coordinator" not in r.stdout


def test_dry_run_status_and_stop_fetch_one_log_per_worker():
    status = _sh("status", *POD, "--accelerator", "v5p-64", "--dry-run")
    assert status.returncode == 0, status.stderr
    cmds = _commands(status.stdout)
    assert cmds[1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "grc-pod"]
    assert "--worker=all" in cmds[1]
    fetches = cmds[3:]
    assert cmds[2] == ["mkdir", "-p", "runs/tpu-logs/grc-pod"]
    assert fetches == [
        [*G.split(), "scp", "grc-pod:grc-jax/logs/train.log",
         f"runs/tpu-logs/grc-pod/worker-{w}.log", *WHERE.split(), f"--worker={w}"]
        for w in range(8)  # v5p-64: 32 chips, 4 per host
    ]  # fmt: skip
    stop = _sh("stop", *POD, "--workers", "2", "--grace", "30", "--dry-run")
    assert stop.returncode == 0, stop.stderr
    kill = _commands(stop.stdout)[1]
    assert "--worker=all" in kill and "kill -TERM $pid" in kill[-1] and "seq 30" in kill[-1]
    assert len(_commands(stop.stdout)) == 2 + 1 + 2


def test_dry_run_git_checkout():
    r = _sh("run", *POD, "--accelerator", "v4-32", "--sync", "git", "--ref", "v1.0", "--repo",
            "https://github.com/me/grc-jax.git", "--no-install", "--dry-run")  # fmt: skip
    assert r.returncode == 0, r.stderr
    cmds = _commands(r.stdout)
    assert len(cmds) == 3 and "pip" not in r.stdout
    assert cmds[1][-1] == (
        "--command=([ -d grc-jax/.git ] || git clone -q https://github.com/me/grc-jax.git grc-jax)"
        " && cd grc-jax && git fetch -q --tags origin && (git checkout -q --detach origin/v1.0 "
        "2>/dev/null || git checkout -q --detach v1.0) && git log -1 --oneline"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--zone", "z", "--dry-run"], "--tpu NAME is required"),
        (["launch", "--tpu", "t"], "unknown verb 'launch'"),
        (["run", "--tpu", "t", "--dry-run"], "--dry-run needs --accelerator"),
        (["run", "--tpu", "t", "--workers", "1", "--dry-run", "--", "steps"], "'steps' is not key"),
        (["run", "--tpu", "t", "--sync", "rsync"], "--sync must be copy or git"),
    ],
)
def test_bad_arguments_fail_with_a_message(args, message):
    r = _sh(*args)
    assert r.returncode == 2 and message in r.stderr, r.stderr


@pytest.fixture
def fake_pod(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    stub = tmp_path / "gcloud"
    stub.write_text(f"#!{sys.executable}\n{STUB}")
    stub.chmod(0o755)
    env = dict(os.environ, GRC_GCLOUD=str(stub), FAKE_HOME=str(home), FAKE_STATE="READY",
               FAKE_TYPE="v5p-8", TMPDIR=str(tmp_path))  # fmt: skip
    return env, home, tmp_path


def _calls(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_missing_gcloud_and_a_tpu_not_ready_fail_early(fake_pod):
    env, home, tmp = fake_pod
    r = _sh("run", *POD, env=dict(env, GRC_GCLOUD=str(tmp / "no/gcloud")))
    assert r.returncode == 2 and "gcloud not found" in r.stderr, r.stderr
    r = _sh("run", *POD, env=dict(env, FAKE_STATE="PREEMPTED"))
    assert r.returncode == 2 and "is PREEMPTED, not READY" in r.stderr, r.stderr
    r = _sh("run", *POD, "--accelerator", "v5p-64", env=env)
    assert r.returncode == 2 and "is a v5p-8, not the --accelerator v5p-64" in r.stderr
    assert [c[3] for c in _calls(tmp)] == ["describe"] * 2  # nothing ran on the workers


def test_run_status_stop_on_a_fake_worker(fake_pod, tmp_path):
    env, home, tmp = fake_pod
    # The worker's venv is set up already (--no-install): its python stands in for training.
    venv = home / "grc-jax/.venv/bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text(
        "#!/usr/bin/env bash\n"
        'echo "train args: $*"\n'
        "trap 'echo \"SIGTERM: checkpoint and exit\"; exit 0' TERM\n"
        "for i in $(seq 600); do sleep 0.1; done\n"
    )
    (venv / "python").chmod(0o755)
    logs = tmp / "fetched"
    common = [*POD, "--logs", str(logs)]
    r = _sh("run", *common, "--no-install", "--run-name", "r1", "--", "train.steps=7", env=env)
    assert r.returncode == 0, r.stderr
    assert (home / "grc-jax/launch/tpu_run.sh").is_file()  # the working tree was copied
    assert (home / "grc-jax/grc_jax/core/distributed.py").is_file()
    assert not (home / "grc-jax/.git").exists() and not (home / "grc-jax-src.tgz").exists()
    log = home / "grc-jax/logs/train.log"
    for _ in range(100):
        if "train args" in (log.read_text() if log.exists() else ""):
            break
        time.sleep(0.1)
    assert "train args: -m grc_jax.cli train --config configs/tiny.yaml train.run_name=r1 " \
        "train.steps=7" in log.read_text()  # fmt: skip
    # A second start refuses while the job runs.
    again = _sh("run", *common, "--no-install", env=env)
    assert again.returncode != 0 and "already running" in again.stderr

    status = _sh("status", *common, env=env)
    assert status.returncode == 0, status.stderr
    assert ": running: train args" in status.stdout
    assert "train args" in (logs / "worker-0.log").read_text()

    stop = _sh("stop", *common, env=env)
    assert stop.returncode == 0, stop.stderr
    assert "stopped" in stop.stdout
    assert "SIGTERM: checkpoint and exit" in (logs / "worker-0.log").read_text()
    status = _sh("status", *common, env=env)
    assert ": stopped: SIGTERM" in status.stdout
