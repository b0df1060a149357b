"""The `grc` entry point: the static command table, lazy imports, and the one place that turns a
`UserError` into `grc <command>: error: <message>` and its exit code (`--debug`: a traceback)."""

import argparse
import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grc_jax.cli import COMMANDS, main
from grc_jax.core.errors import CheckpointError, ConfigError, NonFiniteLossError, UserError

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("jax", "numpy", "orbax", "grain", "transformers", "torch", "flax")
NAMES = [
    "adapter", "aot", "compress", "data", "embed", "eval", "export", "generate", "import-hf",
    "index", "rag", "serve", "tokenizer", "train", "update",
]  # fmt: skip


def _env() -> dict[str, str]:
    """This checkout first on the path, so a subprocess runs the code under test."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _grc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "grc_jax.cli", *args],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _help(*args: str) -> tuple[str, list[str]]:
    """(help text, heavy modules imported) of `grc ARGS --help` in a fresh interpreter."""
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "from grc_jax.cli import main\n"
        f"try:\n    main({[*args, '--help']!r})\n"
        "except SystemExit:\n    pass\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
        "print(f'WALL={time.perf_counter() - t:.3f}s')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    wall = lines[-1]
    print(f"grc {' '.join(args)} --help: {wall}")  # shown with -s; not asserted on
    heavy = lines[-2].removeprefix("HEAVY=")
    return "\n".join(lines[:-2]), [m for m in heavy.split(",") if m]


# ---------------------------------------------------------------------------------- --help


def test_top_level_help_lists_commands_and_imports_nothing_heavy():
    text, heavy = _help()
    assert heavy == []
    assert "--debug" in text
    for name, cmd in COMMANDS.items():
        assert name in text and cmd.help in text


def test_train_and_generate_help_list_their_flags_without_jax():
    text, heavy = _help("train")
    assert "jax" not in heavy
    for flag in ("--config", "--stop-after", "--coordinator", "--num-processes", "overrides"):
        assert flag in text
    text, heavy = _help("generate")
    assert "jax" not in heavy
    for flag in ("--prompt", "--memory", "--max-new-tokens", "--top-p", "--attention-impl"):
        assert flag in text


@pytest.mark.parametrize("name", NAMES)
def test_every_command_help_leaves_jax_out(name):
    text, heavy = _help(name)
    assert f"usage: grc {name}" in text
    assert "jax" not in heavy, heavy


# ---------------------------------------------------------------------------------- the table


def test_static_table_names_modules_with_both_functions():
    assert sorted(COMMANDS) == NAMES
    for name, cmd in COMMANDS.items():
        assert cmd.module.startswith("grc_jax.cli.") and cmd.help and "\n" not in cmd.help
        module = importlib.import_module(cmd.module)
        stem = name.replace("-", "_")
        add, run = getattr(module, f"add_{stem}_arguments"), getattr(module, f"run_{stem}")
        assert callable(add) and callable(run)
        add(argparse.ArgumentParser(prog=f"grc {name}"))  # the arguments set up on their own
    # ... and every command function of those modules is in the table.
    for module_name in {cmd.module for cmd in COMMANDS.values()}:
        module = importlib.import_module(module_name)
        runs = {n.removeprefix("run_") for n in vars(module) if n.startswith("run_")}
        table = {n.replace("-", "_") for n, c in COMMANDS.items() if c.module == module_name}
        assert runs == table, module_name


def test_only_the_cli_package_imports_it():
    package = ROOT / "grc_jax"
    offenders = []
    for path in package.rglob("*.py"):
        if (package / "cli") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "grc_jax.cli" or n.startswith("grc_jax.cli.") for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


# ---------------------------------------------------------------------------------- errors


def _stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    err = _stderr_lines(capsys)
    assert len(err) == 1, err
    assert err[0].startswith("grc train: error: config file ") and "does not exist" in err[0]


def test_user_error_from_a_subprocess_is_one_stderr_line(tmp_path):
    r = _grc("train", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"grc train: error: config file {str(tmp_path / 'nope.yaml')!r} does not exist"
    ]


def test_os_error_on_a_named_path_is_a_user_error(tmp_path, capsys):
    capsys.readouterr()
    missing = tmp_path / "missing.txt"
    assert main(["tokenizer", "train", str(missing), "--out", str(tmp_path / "tok")]) == 2
    err = _stderr_lines(capsys)
    assert len(err) == 1 and err[0].startswith("grc tokenizer: error: ") and str(missing) in err[0]


@pytest.mark.parametrize("error, code", [(NonFiniteLossError, 1), (CheckpointError, 2)])
def test_train_exit_codes_for_non_finite_loss_and_checkpoints(error, code, monkeypatch, capsys):
    """A diverged run exits 1; a checkpoint that cannot be used is a named error like any other
    (exit 2)."""

    def fails(args):
        raise error("step 3: loss is nan\nlast good checkpoint (step 2) kept")

    monkeypatch.setattr("grc_jax.cli.train.run_train", fails)
    capsys.readouterr()
    assert main(["train", "--config", "configs/tiny.yaml"]) == code
    assert _stderr_lines(capsys) == [
        "grc train: error: step 3: loss is nan last good checkpoint (step 2) kept"
    ]


def test_train_exit_1_through_the_real_command(tmp_path, monkeypatch, capsys):
    """`run_train` itself lets a non-finite loss through to `main` (exit 1)."""

    def train(cfg, max_steps=None, hooks=()):
        raise NonFiniteLossError("step 1: non-finite loss")

    monkeypatch.setattr("grc_jax.train.loop.train", train)
    config = str(ROOT / "configs/tiny.yaml")
    capsys.readouterr()
    rc = main(["train", "--config", config, "--no-distributed", f"train.output_dir={tmp_path}"])
    assert rc == 1
    assert _stderr_lines(capsys) == ["grc train: error: step 1: non-finite loss"]


def test_debug_raises_the_user_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        main(["--debug", "train", "--config", str(tmp_path / "nope.yaml")])


def test_debug_shows_a_traceback(tmp_path):
    r = _grc("--debug", "train", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 1  # Python's own exit code of an uncaught exception
    assert r.stderr.startswith("Traceback (most recent call last):")
    assert "ConfigError: config file" in r.stderr and "grc train: error:" not in r.stderr


@pytest.mark.parametrize("bug", [ZeroDivisionError, ValueError, FileNotFoundError, RuntimeError])
def test_other_exceptions_propagate(bug, monkeypatch):
    def broken(args):
        raise bug("a bug, not a user error")

    monkeypatch.setattr("grc_jax.cli.data.run_data", broken)
    with pytest.raises(bug, match="a bug") as info:
        main(["data", "synth"])
    assert not isinstance(info.value, UserError)


def test_usage_errors_stay_argparse_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["train"])  # --config is required
    assert info.value.code == 2 and "--config" in capsys.readouterr().err


def test_aot_topology_error_is_one_line():
    r = _grc("aot", "--config", "configs/tiny.yaml", "--topology", "tpu-128")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "grc aot: error: --topology 'tpu-128': expected an accelerator type such as v5p-128, "
        "v4-32, v5litepod-16, v6e-64, or a topology such as v5p:4x4x4"
    ]
