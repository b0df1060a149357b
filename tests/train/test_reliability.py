"""Run reliability (docs/reliability.md): a resume that would change the parameters is refused
before anything is written, the run lock, verified checkpoints (manifest, finite params,
`train.resume_step`), legacy checkpoints, metrics without replayed duplicates after a kill, and
SIGTERM to a single process. Real runs of a tiny model; most tests work on copies of one run."""

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from grc_jax.checkpoints import RunCheckpoints, load_model
from grc_jax.cli import main
from grc_jax.core.config import Config, TrainConfig, load_config, save_config
from grc_jax.core.errors import (
    CheckpointError,
    ConfigError,
    ModelLoadError,
    NonFiniteLossError,
    RunInUseError,
)
from grc_jax.core.sharding import make_mesh
from grc_jax.data.synth import synthesize
from grc_jax.integrity import MANIFEST, check_step
from grc_jax.train.hooks import CheckFinite, Schedule, Tick
from grc_jax.train.loop import train
from grc_jax.train.preemption import SigtermNotice
from grc_jax.train.resume import drop_rows_after, param_config_diff, resume_target
from grc_jax.train.run_lock import RunLock
from grc_jax.train.state import create_state
from tests.helpers import TINY_MODEL

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    *TINY_MODEL, "train.log_every=1", "train.eval_every=1000", "train.warmup_steps=2",
    "train.steps=200", "train.checkpoint_every=2",
]  # fmt: skip
BASE_STEPS = 8  # the base run stops there; it keeps checkpoints 4, 6, 8
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, seed=0, queries_per_doc=1)
    return out


def overrides(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [
        *TINY, f"data.train_path={data}/train.jsonl", f"data.eval_path={data}/validation.jsonl",
        f"train.output_dir={out}", f"train.run_name={name}", *extra,
    ]  # fmt: skip


def config(data: Path, out: Path, name: str, *extra: str) -> Config:
    return load_config(ROOT / "configs/tiny.yaml", overrides(data, out, name, *extra))


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """A run trained straight to step 8 (of train.steps=200), checkpoints 4, 6, 8."""
    out = tmp_path_factory.mktemp("base")
    train(config(data, out, "base"), max_steps=BASE_STEPS, quiet=True)
    return out / "base"


def copy_run(base: Path, out: Path, name: str) -> Path:
    shutil.copytree(base, out / name)
    return out / name


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
    return {r["step"]: r["loss/total"] for r in rows}


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def state_file(run: Path, step: int) -> Path:
    """The largest data file of checkpoint `step`'s train state."""
    files = [p for p in (run / f"checkpoints/{step}/state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def grc_train(*args: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, "-m", "grc_jax.cli", "train", "--config", "configs/tiny.yaml", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
    )  # fmt: skip


def wait_for_rows(proc: subprocess.Popen, metrics: Path, rows: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not (metrics.exists() and metrics.read_text().count("\n") >= rows):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training exited early ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("training did not log in time")
        time.sleep(0.05)


# ------------------------------------------------------------------------ config on resume


def test_resume_changing_the_params_is_refused_before_anything_is_written(base, data, tmp_path):
    run = copy_run(base, tmp_path, "r1")
    before = snapshot(run)
    changed = config(data, tmp_path, "r1", "model.n_layers=2", "grc.num_latents=8")
    with pytest.raises(ConfigError) as e:
        train(changed, quiet=True)
    message = str(e.value)
    assert "model.n_layers: 1 (saved) -> 2 (given)" in message
    assert "grc.num_latents: 4 (saved) -> 8 (given)" in message
    assert "\n" not in message
    assert snapshot(run) == before  # config.yaml (and everything else) as it was

    # The CLI: one line, exit 2, still nothing written.
    proc = grc_train(*overrides(data, tmp_path, "r1", "model.n_layers=2"))
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("grc train: error:")]
    assert len(errors) == 1 and "model.n_layers: 1 (saved) -> 2 (given)" in errors[0]
    assert snapshot(run) == before


def test_resume_with_other_hyperparameters_saves_the_new_config(base, data, tmp_path, capsys):
    """Learning rate, cadences and steps may change; a stale lock (a holder that died) is taken
    over with a warning naming it."""
    run = copy_run(base, tmp_path, "r2")
    (run / ".lock").write_text("host=elsewhere pid=999999 since=2024-01-01T00:00:00+00:00\n")
    cfg = config(data, tmp_path, "r2", "train.learning_rate=1e-3", "train.log_every=3")
    result = train(cfg, max_steps=BASE_STEPS + 1, quiet=True)
    assert result["step"] == BASE_STEPS + 1
    err = capsys.readouterr().err
    assert "previous holder (host elsewhere, pid 999999, since 2024-01-01T00:00:00+00:00)" in err
    assert load_config(run / "config.yaml").train.learning_rate == 1e-3
    assert (run / ".lock").read_text() == ""  # released: no holder left behind
    assert sorted(losses(run)) == [*range(1, BASE_STEPS + 1), BASE_STEPS + 1]


def test_param_keys_and_free_keys():
    saved = Config()
    free = load_config(ROOT / "configs/tiny.yaml", ["model.dtype=bfloat16", "train.steps=7"])
    tiny = load_config(ROOT / "configs/tiny.yaml")
    assert param_config_diff(tiny, free) == []
    given = Config(train=TrainConfig(lora_rank=4, learning_rate=1.0))
    assert param_config_diff(saved, given) == ["train.lora_rank: 0 (saved) -> 4 (given)"]


def test_resume_step_is_applied_once():
    steps = [4, 6, 8]
    given = Config(train=TrainConfig(resume_step=6))
    assert resume_target(given, Config(), steps) == 6  # first time: from the step asked for
    assert resume_target(given, given, [4, 6, 8, 10]) == 10  # config.yaml records it: applied
    assert resume_target(Config(), given, steps) == 8
    with pytest.raises(CheckpointError, match=r"train.resume_step=5: .*available: \[4, 6, 8\]"):
        resume_target(Config(train=TrainConfig(resume_step=5)), None, steps)
    with pytest.raises(ConfigError, match="resume_step"):
        load_config(ROOT / "configs/tiny.yaml", ["train.resume_step=0"])


# ------------------------------------------------------------------------ inference loads


def test_load_model_refuses_a_checkpoint_of_another_param_tree(base, tmp_path, capsys):
    run = copy_run(base, tmp_path, "r3")
    save_config(load_config(base / "config.yaml", ["model.n_layers=2"]), run / "config.yaml")
    with pytest.raises(ModelLoadError, match=r"params\.model\.layers_1\.\S+ \(config only\)"):
        load_model(run)
    save_config(load_config(base / "config.yaml", ["grc.num_latents=8"]), run / "config.yaml")
    with pytest.raises(ModelLoadError) as e:
        load_model(run, step=6)
    shapes = "params.model.latents: (4, 32) in the checkpoint, (8, 32) from the config"
    assert shapes in str(e.value)
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "params.model.latents" in err[0], err


# ------------------------------------------------------------------------------ run lock


def test_second_process_is_refused_naming_the_holder(base, data, tmp_path):
    run = copy_run(base, tmp_path, "r4")
    before = snapshot(run)
    with RunLock(run):
        holder = (run / ".lock").read_text()
        assert f"host={socket.gethostname()} pid={os.getpid()} since=" in holder
        proc = grc_train(*overrides(data, tmp_path, "r4"))
        out, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 2, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("grc train: error:")]
        assert len(errors) == 1, err[-3000:]
        assert f"host {socket.gethostname()}, pid {os.getpid()}, since " in errors[0]
        assert "in use by another `grc train`" in errors[0]
        with pytest.raises(RunInUseError, match=f"pid {os.getpid()}"):
            train(config(data, tmp_path, "r4"), quiet=True)  # the same process: flock is per open
    after = snapshot(run)
    assert after.pop(".lock") == b"" and before.pop(".lock") == b""
    assert after == before


# -------------------------------------------------------------------- verified checkpoints


def test_flipped_byte_is_refused_then_resume_step_resumes(base, data, tmp_path, capsys):
    run = copy_run(base, tmp_path, "r5")
    victim = state_file(run, 8)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    rel = victim.relative_to(run / "checkpoints/8").as_posix()
    before = snapshot(run)
    with pytest.raises(CheckpointError) as e:
        train(config(data, tmp_path, "r5"), quiet=True)
    assert f"checkpoint step 8 ({run.absolute() / 'checkpoints/8'}) cannot be restored: " in str(
        e.value
    )
    assert f"file {rel} changed (its sha256 differs from the manifest)" in str(e.value)
    assert "train.resume_step=6" in str(e.value)
    assert snapshot(run) == before
    # Inference gets the same check and the same advice; the older step loads.
    with pytest.raises(CheckpointError, match=r"checkpoint step 8 .* --step 6"):
        load_model(run)
    load_model(run, step=6)

    capsys.readouterr()
    resumed = train(config(data, tmp_path, "r5", "train.resume_step=6"), max_steps=9, quiet=True)
    assert resumed["step"] == 9
    assert "moved the newer checkpoints [8]" in capsys.readouterr().out
    assert (tmp_path / "r5/checkpoints.set_aside/8" / rel).read_bytes() == bytes(raw)
    assert RunCheckpoints(run / "checkpoints", 3).all_steps() == [6, 8, 9]
    assert all(check_step(run / "checkpoints", s, [6, 8, 9]).status == "verified" for s in (8, 9))
    # Steps 7 and 8 were computed again, exactly as the first time; logged once.
    straight, again = losses(base), losses(run)
    assert sorted(again) == list(range(1, 10))
    for step in range(1, BASE_STEPS + 1):
        assert again[step] == straight[step], step


def test_truncated_file_is_detected(base, tmp_path):
    run = copy_run(base, tmp_path, "r6")
    victim = state_file(run, 8)
    size = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[: size // 3])
    rel = victim.relative_to(run / "checkpoints/8").as_posix()
    with pytest.raises(CheckpointError) as e:
        load_model(run)
    assert f"checkpoint step 8 ({run.absolute() / 'checkpoints/8'}) cannot be restored" in str(
        e.value
    )
    assert f"file {rel} is truncated ({size // 3} of {size} bytes)" in str(e.value)
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"file {rel} is missing"):
        load_model(run, step=8)


def test_non_finite_params_are_detected(base, data, tmp_path):
    run = copy_run(base, tmp_path, "r7")
    cfg = config(data, tmp_path, "r7")
    state, _ = create_state(cfg, make_mesh(cfg.mesh), jax.random.key(0))
    ckpts = RunCheckpoints(run / "checkpoints", 5)
    state, data_state, _ = ckpts.restore(8, state)
    model = dict(state.params.model)
    model["final_norm"] = {"scale": model["final_norm"]["scale"] * jnp.nan}
    ckpts.save(10, state.replace(params=state.params.replace(model=model)), data_state)
    ckpts.close()
    assert check_step(run / "checkpoints", 10, [4, 6, 8, 10]).status == "verified"  # files fine
    with pytest.raises(CheckpointError) as e:
        load_model(run)
    assert "checkpoint step 10" in str(e.value)
    assert "non-finite params in params.model.final_norm.scale" in str(e.value)
    assert "--step 8" in str(e.value)
    with pytest.raises(CheckpointError, match=r"step 10 .*non-finite params in params\.model"):
        train(cfg, quiet=True)


def test_legacy_checkpoint_without_manifest_loads_with_a_warning(base, tmp_path, capsys):
    run = copy_run(base, tmp_path, "r8")
    (run / f"checkpoints/8/{MANIFEST}").unlink()
    with pytest.raises(CheckpointError, match=f"step 8 .*manifest {MANIFEST} is missing"):
        load_model(run)  # older checkpoints have one: this one lost it
    for manifest in run.glob(f"checkpoints/*/{MANIFEST}"):
        manifest.unlink()
    capsys.readouterr()
    cfg, params, _ = load_model(run)
    _, reference, _ = load_model(base)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, reference))
    err = capsys.readouterr().err
    assert f"checkpoint step 8 in {run.absolute() / 'checkpoints'} has no {MANIFEST}" in err
    assert "restoring it unverified" in err


def test_check_finite_names_the_newest_verified_checkpoint(tmp_path):
    ckpts = RunCheckpoints(tmp_path / "checkpoints", keep=10)
    for step in (2, 4):
        ckpts.save(step, {"w": jnp.arange(3.0) + step}, {"step": step})
    ckpts.wait()
    manifest = json.loads((tmp_path / f"checkpoints/4/{MANIFEST}").read_text())
    (tmp_path / "checkpoints/4" / next(iter(manifest["files"]))).write_bytes(b"")
    run = SimpleNamespace(ckpts=ckpts)
    nan = {"loss/total": float("nan"), "loss/gen": 1.0, "loss/rep": 1.0, "loss/comp": 1.0,
           "params_finite": 1.0}  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"last good checkpoint \(step 2\)"):
        CheckFinite(Schedule(every=1))(run, Tick(5, 10, False, 0, nan))
    ckpts.close()


# --------------------------------------------------------------------- kill, SIGTERM, resume


def tensorboard_events(path: Path):
    from tensorboardX.proto.event_pb2 import Event

    raw, i = path.read_bytes(), 0
    while i < len(raw):
        (n,) = struct.unpack("<Q", raw[i : i + 8])
        yield Event.FromString(raw[i + 12 : i + 12 + n])
        i += 12 + n + 4


def test_kill_and_resume_keeps_each_metrics_step_once(data, tmp_path, capsys):
    run = tmp_path / "killed"
    proc = grc_train(*overrides(data, tmp_path, "killed"))
    wait_for_rows(proc, run / "metrics.jsonl", 5)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT_S)
    logged = max(losses(run))
    restored = max(RunCheckpoints(run / "checkpoints", 3).all_steps(), default=0)
    assert logged >= 5 and logged >= restored  # (usually >: the resume redoes logged steps)

    capsys.readouterr()
    end = logged + 2
    train(config(data, tmp_path, "killed"), max_steps=end, quiet=True)
    assert f"pid {proc.pid}" in capsys.readouterr().err  # the killed holder's lock taken over
    assert sorted(losses(run)) == list(range(1, end + 1))  # each step once
    # TensorBoard: the resumed session hides the earlier events after the restored step.
    newest = max((run / "tb").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    starts = [e.step for e in tensorboard_events(newest) if e.HasField("session_log")]
    assert starts == [restored + 1 if restored else 0]


def test_sigterm_to_a_single_process_checkpoints_and_resumes_exactly(base, data, tmp_path):
    run = tmp_path / "term"
    proc = grc_train(*overrides(data, tmp_path, "term", "train.checkpoint_every=100"))
    wait_for_rows(proc, run / "metrics.jsonl", 1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err[-3000:]
    steps = RunCheckpoints(run / "checkpoints", 3).all_steps()
    assert len(steps) == 1 and steps[0] < 100, steps
    stopped = steps[0]
    assert f"preemption notice: saved checkpoint {stopped}, stopping" in out
    assert check_step(run / "checkpoints", stopped, steps).status == "verified"
    assert sorted(losses(run)) == list(range(1, stopped + 1))

    end = stopped + 2
    reference = losses(base)
    if end > BASE_STEPS:  # stopped late: a straight run that long
        train(config(data, tmp_path, "straight"), max_steps=end, quiet=True)
        reference = losses(tmp_path / "straight")
    train(config(data, tmp_path, "term", "train.checkpoint_every=100"), max_steps=end, quiet=True)
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, end + 1))
    for step in range(1, end + 1):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])


def test_sigterm_notice_restores_the_previous_handler():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append(a[0]))
    try:
        with SigtermNotice() as notice:
            os.kill(os.getpid(), signal.SIGTERM)
            assert notice.received and not seen
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_drop_rows_after_rewrites_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(rows) + '\n{"step": 5, "lo')  # a line cut by a crash
    assert drop_rows_after(path, 2) == 3
    assert path.read_text() == rows[0] + "\n" + rows[1] + "\n"
    assert drop_rows_after(path, 2) == 0
    assert drop_rows_after(tmp_path / "missing.jsonl", 2) == 0


def test_broken_data_iterator_state_is_detected(base, data, tmp_path):
    """The checkpoint's `data` item (the data-iterator position) is covered by the manifest too:
    a damaged one is named before the run resumes, and nothing is written."""
    run = copy_run(base, tmp_path, "r_iter")
    victims = [p for p in (run / "checkpoints/8/data").rglob("*") if p.is_file()]
    assert victims, "the checkpoint has no data item"
    victim = victims[0]
    victim.write_text('{"broken": ')
    rel = victim.relative_to(run / "checkpoints/8").as_posix()
    before = snapshot(run)
    with pytest.raises(CheckpointError) as e:
        train(config(data, tmp_path, "r_iter"), quiet=True)
    assert "checkpoint step 8" in str(e.value) and f"file {rel}" in str(e.value)
    assert "train.resume_step=6" in str(e.value)
    assert snapshot(run) == before
