"""Bad training data and bad config values through `grc train`, one table: each case ends in one
stderr line naming the thing at fault and exit code 2 (issue 11, fault campaign part d)."""

import json
from pathlib import Path

import pytest

from grc_jax.cli import main
from grc_jax.data.synth import synthesize
from tests.helpers import TINY_MODEL

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, seed=0, queries_per_doc=1)
    return out


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def _cases(data: Path, bad: Path) -> dict[str, tuple[list[str], str]]:
    good = (data / "train.jsonl").read_text().splitlines()
    huge = json.loads(good[0]) | {"positive": " ".join(["word"] * 30000)}
    files = {
        "all_bad": _write(bad, "all_bad.jsonl", "nope\n{]\n"),
        "empty": _write(bad, "empty.jsonl", ""),
        "blank": _write(bad, "blank.jsonl", "\n\n\n"),
        "bad_line": _write(bad, "bad_line.jsonl", "\n".join([*good[:20], "{]"]) + "\n"),
        "missing_field": _write(bad, "missing.jsonl", json.dumps({"query": "q"}) + "\n"),
        # The large record last, after 200 good ones: every record is checked before step 1.
        "oversized": _write(bad, "big.jsonl", "\n".join([*good[:200], json.dumps(huge)]) + "\n"),
    }
    f = {k: str(v) for k, v in files.items()}
    return {
        # bad data: (overrides, what the one error line must name)
        "all lines bad, skipping on": (
            [f"data.train_path={f['all_bad']}", "data.skip_bad_lines=true"],
            f"{f['all_bad']}: no usable record (2 lines, all skipped as bad",
        ),
        "empty file": ([f"data.train_path={f['empty']}"], f"{f['empty']}: no usable record"),
        "only blank lines": ([f"data.train_path={f['blank']}"], f"{f['blank']}: no usable record"),
        "a bad line, skipping off": (
            [f"data.train_path={f['bad_line']}"], f"{f['bad_line']}:21: not valid JSON"
        ),
        "a record without 'positive'": (
            [f"data.train_path={f['missing_field']}"], f"{f['missing_field']}:1: field 'positive'"
        ),
        "a record too large for a batch": (
            [f"data.train_path={f['oversized']}"], f"{f['oversized']}:201: the record's group"
        ),
        "missing data file": (
            [f"data.train_path={bad / 'nope.jsonl'}"], f"{bad / 'nope.jsonl'}"
        ),
        "vocabulary smaller than the data needs": (
            ["model.vocab_size=16"], "model.vocab_size=16 is too small"
        ),
        # bad config values
        "negative min_lr_ratio": (["train.min_lr_ratio=-5"], "'train.min_lr_ratio'"),
        "negative grad_clip": (["train.grad_clip=-1"], "'train.grad_clip'"),
        "negative weight_decay": (["train.weight_decay=-1"], "'train.weight_decay'"),
        "negative init_std": (["model.init_std=-1"], "'model.init_std'"),
        "negative max_position_embeddings": (
            ["model.max_position_embeddings=-5"], "'model.max_position_embeddings'"
        ),
        "infinite learning rate": (["train.learning_rate=inf"], "'train.learning_rate'"),
        "run name escaping the runs directory": (
            ["train.run_name=../../escape"], "'train.run_name'"
        ),
        "unknown key": (["train.nope=1"], "train.nope"),
        "heads not divisible by kv heads": (["model.n_kv_heads=3"], "model.n_kv_heads"),
    }  # fmt: skip


CASES = [
    "all lines bad, skipping on", "empty file", "only blank lines", "a bad line, skipping off",
    "a record without 'positive'", "a record too large for a batch", "missing data file",
    "vocabulary smaller than the data needs", "negative min_lr_ratio", "negative grad_clip",
    "negative weight_decay", "negative init_std", "negative max_position_embeddings",
    "infinite learning rate", "run name escaping the runs directory", "unknown key",
    "heads not divisible by kv heads",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_named_line_and_exit_2(case, data, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    overrides, named = _cases(data, bad)[case]
    args = [
        "train", "--config", str(ROOT / "configs/tiny.yaml"), "--no-distributed", *TINY_MODEL,
        f"data.train_path={data}/train.jsonl", f"data.eval_path={data}/validation.jsonl",
        f"train.output_dir={tmp_path / 'runs'}", "train.steps=2", *overrides,
    ]  # fmt: skip
    capsys.readouterr()
    rc = main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("grc train: error: "), err
    assert named in err[0], err[0]
