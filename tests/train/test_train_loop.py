"""The training loop end to end: bit-identical resume, non-finite stop, checkpoint errors, and
bad data: skipped lines counted (metrics.jsonl, summary) on a fresh run and after a resume, data
without a usable record, records too large for a batch, a vocabulary too small."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from grc_jax.checkpoints import RunCheckpoints
from grc_jax.cli import main
from grc_jax.core.config import load_config
from grc_jax.core.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError
from grc_jax.data.synth import synthesize
from grc_jax.train.loop import train
from tests.helpers import TINY_MODEL, word_tokenizer

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


@pytest.mark.slow  # long: `make test-all` (README, Tests)
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


@pytest.mark.slow  # long: `make test-all` (README, Tests)
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


# ------------------------------------------------------------------------------- bad data

TINY = [
    *TINY_MODEL, "train.warmup_steps=1", "train.steps=4", "train.log_every=1",
    "train.checkpoint_every=2", "train.eval_every=1000",
]  # fmt: skip
BAD_JSON = "{not json"


def _tiny_args(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [
        "train", "--config", str(ROOT / "configs/tiny.yaml"), *TINY,
        f"data.train_path={data}", f"data.eval_path={data}", f"train.output_dir={out}",
        f"train.run_name={name}", *extra,
    ]  # fmt: skip


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _good_lines(data_dir: Path, n: int) -> list[str]:
    return (data_dir / "train.jsonl").read_text().splitlines()[:n]


def _one_line_error(capsys, args) -> str:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("grc train: error: ")
    return err[0].removeprefix("grc train: error: ")


def test_skipped_lines_on_a_fresh_run_are_counted_and_skipped_again_on_resume(
    data_dir, tmp_path, capsys
):
    lines = _good_lines(data_dir, 6)
    big = json.loads(lines[0])
    big["positive"] = " ".join([big["positive"]] * 40)  # its group cannot fit 8 rows x 128
    lines.insert(2, BAD_JSON)  # line 3
    lines.insert(4, json.dumps(big))  # line 5
    path = _write_lines(tmp_path / "train.jsonl", lines)
    args = _tiny_args(path, tmp_path, "skip", "data.skip_bad_lines=true")
    capsys.readouterr()
    # A fresh run: the tokenizer is trained on the good records only.
    assert main([*args, "--stop-after", "2"]) == 0
    first = capsys.readouterr().out
    assert main(args) == 0  # the resume meets both records again and skips them
    second = capsys.readouterr().out
    assert "resumed" in second
    for reason in (f"{path}:3: not valid JSON", f"{path}:5: the record's group of 4 examples"):
        assert f"skipped (data.skip_bad_lines): {reason}" in first
    assert f"skipped 2 bad record(s) of {path} (data.skip_bad_lines=true" in second
    rows = [json.loads(line) for line in (tmp_path / "skip/metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["data/bad_lines_skipped"] == 2  # each record once, however many epochs
    counts = [r["data/bad_lines_skipped"] for r in rows]
    assert counts == sorted(counts) and counts[0] >= 1


def test_data_without_a_usable_record_stops_before_training(data_dir, tmp_path, capsys):
    bad = _write_lines(tmp_path / "bad.jsonl", [BAD_JSON] * 5)
    blank = _write_lines(tmp_path / "blank.jsonl", ["", " ", ""])
    all_bad = f"{bad}: no usable record (5 lines, all skipped as bad; first: {bad}:"
    # Tokenizer training reads the data first (in file order) ...
    err = _one_line_error(capsys, _tiny_args(bad, tmp_path, "a", "data.skip_bad_lines=true"))
    assert err.startswith(f"{all_bad}1: not valid JSON")
    assert _one_line_error(capsys, _tiny_args(blank, tmp_path, "b")) == (
        f"{blank}: no usable record (3 lines, all blank)"
    )
    assert not (tmp_path / "a/tokenizer.model").exists()
    # ... with a given tokenizer the pipeline stops after one pass instead of spinning.
    tok = word_tokenizer(tmp_path / "tok", ["a", "b"]).path.parent
    err = _one_line_error(capsys, _tiny_args(
        bad, tmp_path, "c", "data.skip_bad_lines=true", f"data.tokenizer={tok}"
    ))  # fmt: skip
    assert err.startswith(all_bad) and "not valid JSON" in err  # the first met (shuffled)
    assert not list((tmp_path / "c").glob("checkpoints/*"))


def test_oversized_record_without_skipping_names_its_line(data_dir, tmp_path):
    lines = _good_lines(data_dir, 6)
    big = json.loads(lines[3])
    big["negatives"] = [" ".join([n] * 30) for n in big["negatives"]]
    lines[3] = json.dumps(big)
    path = _write_lines(tmp_path / "train.jsonl", lines)
    cfg = load_config(ROOT / "configs/tiny.yaml", _tiny_args(path, tmp_path, "big")[3:])
    with pytest.raises(DataError) as e:
        train(cfg, quiet=True)
    msg = str(e.value)
    assert msg.startswith(f"{path}:4: the record's group of 4 examples (")
    assert "does not fit in one batch of 8 rows x 128 tokens" in msg


def test_vocab_size_too_small_for_the_tokenizer_is_named(data_dir, tmp_path, capsys):
    path = _write_lines(tmp_path / "train.jsonl", _good_lines(data_dir, 6))
    err = _one_line_error(capsys, _tiny_args(path, tmp_path, "v", "model.vocab_size=12"))
    assert err.startswith(f"model.vocab_size=12 is too small for a tokenizer of {path}: the data")
    assert "reserved pieces need at least" in err
    # A given tokenizer larger than the model's vocabulary.
    tok = word_tokenizer(tmp_path / "tok", [f"w{i}" for i in range(40)])
    cfg = load_config(ROOT / "configs/tiny.yaml", _tiny_args(
        path, tmp_path, "w", f"data.tokenizer={tok.path.parent}", "model.vocab_size=32"
    )[3:])  # fmt: skip
    want = r"^model.vocab_size=32 is smaller than the tokenizer's 44 tokens \(.*tokenizer.json\)"
    with pytest.raises(ConfigError, match=want):
        train(cfg, quiet=True)
