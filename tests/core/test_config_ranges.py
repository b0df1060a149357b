"""Range rules of every numeric config key, run-name confinement, the batch / mesh divisibility
check, and the CLI's handling of both (one stderr line, exit 2, before any JAX work)."""

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from grc_jax.checkpoints import run_dir
from grc_jax.cli import build_parser, main, parse_args
from grc_jax.core.config import (
    Config,
    ConfigError,
    Range,
    RopeScalingConfig,
    config_from_dict,
    load_config,
    save_config,
)
from grc_jax.core.sharding import check_batch_sharding

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs/tiny.yaml")


def _fields(cls: type, prefix: str = ""):
    """(dotted key, type) of every leaf field of a config dataclass, nested sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        nested = [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]
        if nested:
            yield from _fields(nested[0], f"{key}.")
        else:
            yield key, tp, f


def _numeric(tp) -> type | None:
    options = [a for a in (typing.get_args(tp) or (tp,)) if a is not type(None)]
    return options[0] if options in ([int], [float]) else None


NUMERIC = [(key, _numeric(tp), f) for key, tp, f in _fields(Config) if _numeric(tp)]
FLOAT_KEYS = [key for key, tp, _ in NUMERIC if tp is float]


def test_every_numeric_key_declares_its_range():
    assert len(NUMERIC) >= 40  # every section's numbers, rope scaling and loss weights included
    missing = [key for key, _, f in NUMERIC if not isinstance(f.metadata.get("grc_rule"), Range)]
    assert missing == []
    sections = {key.rsplit(".", 1)[0] for key, _, _ in NUMERIC}
    assert {"model", "model.rope_scaling", "grc", "grc.loss_weights", "mesh", "data", "train"} <= (
        sections
    )


def test_defaults_and_bundled_configs_pass():
    Config().validate()
    config_from_dict({"model": {"rope_scaling": {}}})
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


# (override or tuple of overrides, dotted key, expected: what the message says after "expected",
# got)
BAD = [
    # the values issue 11 names
    ("train.min_lr_ratio=-5", "train.min_lr_ratio", "a number in [0, 1]", "-5"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio", "a number in [0, 1]", "1.5"),
    ("train.grad_clip=-1", "train.grad_clip", "a positive number (> 0)", "-1"),
    ("train.grad_clip=0", "train.grad_clip", "a positive number (> 0)", "0"),
    ("train.weight_decay=-1", "train.weight_decay", "a non-negative number (>= 0)", "-1"),
    ("model.init_std=-1", "model.init_std", "a positive number (> 0)", "-1"),
    ("model.max_position_embeddings=-5", "model.max_position_embeddings",
     "a positive integer (>= 1)", "-5"),
    ("train.learning_rate=inf", "train.learning_rate", "a positive finite number (> 0)", "inf"),
    ("train.learning_rate=nan", "train.learning_rate", "a positive finite number (> 0)", "nan"),
    ("train.learning_rate=0", "train.learning_rate", "a positive number (> 0)", "0"),
    ("train.learning_rate=-1e-3", "train.learning_rate", "a positive number (> 0)", "-0.001"),
    # model
    ("model.vocab_size=0", "model.vocab_size", "a positive integer (>= 1)", "0"),
    ("model.n_layers=-1", "model.n_layers", "a positive integer (>= 1)", "-1"),
    ("model.rms_norm_eps=0", "model.rms_norm_eps", "a positive number (> 0)", "0"),
    ("model.rope_theta=-10000", "model.rope_theta", "a positive number (> 0)", "-10000"),
    ("model.n_kv_heads=3", "model.n_kv_heads",
     "a divisor of n_heads=4 (grouped-query attention)", "3"),
    ("model.head_dim=31", "model.head_dim", "an even number (RoPE pairs)", "31"),
    # model.rope_scaling
    ("model.rope_scaling.factor=0", "model.rope_scaling.factor", "a positive number (> 0)", "0"),
    ("model.rope_scaling.original_max_position_embeddings=0",
     "model.rope_scaling.original_max_position_embeddings", "a positive integer (>= 1)", "0"),
    ("model.rope_scaling.low_freq_factor=5", "model.rope_scaling.high_freq_factor",
     "a number above low_freq_factor=5", "4"),
    # grc
    ("grc.num_latents=0", "grc.num_latents", "a positive integer (>= 1)", "0"),
    ("grc.projection_dim=0", "grc.projection_dim", "a positive integer or null (>= 1)", "0"),
    ("grc.temperature=0", "grc.temperature", "a positive number (> 0)", "0"),
    ("grc.latent_init_noise=-0.1", "grc.latent_init_noise", "a non-negative number (>= 0)",
     "-0.1"),
    # grc.loss_weights
    ("grc.loss_weights.rep=-1", "grc.loss_weights.rep", "a non-negative number (>= 0)", "-1"),
    ("grc.loss_weights={gen: 0, rep: 0, comp: 0}", "grc.loss_weights",
     "at least one weight above 0", "{'gen': 0.0, 'rep': 0.0, 'comp': 0.0}"),
    # mesh
    ("mesh.tensor=0", "mesh.tensor",
     "a positive integer or -1 (>= 1; -1: the remaining devices)", "0"),
    ("mesh.data=-2", "mesh.data",
     "a positive integer or -1 (>= 1; -1: the remaining devices)", "-2"),
    # data
    ("data.seq_len=0", "data.seq_len", "a positive integer (>= 1)", "0"),
    ("data.batch_size=-8", "data.batch_size", "a positive integer (>= 1)", "-8"),
    ("data.reasoning_dropout=1.01", "data.reasoning_dropout", "a number in [0, 1]", "1.01"),
    ("data.shuffle_seed=-1", "data.shuffle_seed", "an integer in [0, 4294967295]", "-1"),
    ("data.rag_fraction=-0.1", "data.rag_fraction", "a number in [0, 1] (0: no RAG examples)",
     "-0.1"),
    ("data.recurrent_fraction=2", "data.recurrent_fraction",
     "a number in [0, 1] (0: no recurrent chains)", "2"),
    ("data.rag_memories=1", "data.rag_memories", "an integer >= 2", "1"),
    ("data.rag_target_tokens=0", "data.rag_target_tokens", "a positive integer (>= 1)", "0"),
    ("data.chunk_tokens=0", "data.chunk_tokens", "a positive integer (>= 1)", "0"),
    ("data.max_chunks=1", "data.max_chunks", "an integer >= 2", "1"),
    # a RAG example reads several memories, a chain the previous one: each needs its mode
    (("grc.memory_mode=recurrent", "data.rag_fraction=0.5"), "data.rag_fraction",
     "0 with grc.memory_mode=recurrent (a RAG example reads several memories: independent)",
     "0.5"),
    ("data.recurrent_fraction=0.5", "data.recurrent_fraction",
     "0 with grc.memory_mode=independent (a chain reads the previous memory: recurrent)", "0.5"),
    # train
    ("train.steps=0", "train.steps", "a positive integer (>= 1)", "0"),
    ("train.warmup_steps=-1", "train.warmup_steps", "a non-negative integer (>= 0)", "-1"),
    ("train.seed=4294967296", "train.seed", "an integer in [0, 4294967295]", "4294967296"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints", "a positive integer (>= 1)", "0"),
    ("train.eval_queries=0", "train.eval_queries", "a positive integer (>= 1)", "0"),
    ("train.export_every=-1", "train.export_every",
     "a non-negative integer (>= 0; 0: no periodic export)", "-1"),
    ("train.lora_rank=-4", "train.lora_rank", "a non-negative integer (>= 0; 0: no LoRA)", "-4"),
    ("train.microbatches=0", "train.microbatches", "a positive integer (>= 1)", "0"),
    ("train.microbatches=3", "train.microbatches",
     "a divisor of data.batch_size=8 (GradCache microbatches)", "3"),
]  # fmt: skip


@pytest.mark.parametrize("override, key, expected, got", BAD, ids=[str(b[0]) for b in BAD])
def test_out_of_range_value_names_key_range_and_value(override, key, expected, got):
    with pytest.raises(ConfigError) as err:
        config_from_dict({}, [override] if isinstance(override, str) else override)
    assert str(err.value) == f"config key '{key}': expected {expected}, got {got}"


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", ".inf", ".nan"])
def test_no_float_key_takes_a_non_finite_value(key, value):
    with pytest.raises(ConfigError, match=rf"^config key '{key}': expected .*finite.*, got "):
        config_from_dict({}, [f"{key}={value}"])


def test_bounds_themselves_are_allowed():
    cfg = config_from_dict(
        {},
        ["train.min_lr_ratio=0", "data.reasoning_dropout=1", "train.weight_decay=0",
         "train.warmup_steps=0", "train.export_every=0", "grc.loss_weights.gen=0",
         "grc.latent_init_noise=0", "train.seed=4294967295", "grc.projection_dim=null",
         "mesh.data=1", "mesh.tensor=-1", "train.microbatches=8", "data.rag_fraction=1",
         "data.rag_memories=2", "data.max_chunks=2", "data.chunk_tokens=1"],
    )  # fmt: skip
    assert cfg.train.min_lr_ratio == 0.0 and cfg.mesh.tensor == -1


def test_range_applies_to_sections_built_in_code():
    with pytest.raises(ConfigError, match=r"'rope_scaling.factor': expected a positive number"):
        RopeScalingConfig(factor=-2.0).validate("rope_scaling")


def test_load_config_prefixes_the_file():
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["train.grad_clip=-1"])
    assert str(err.value).endswith(
        "tiny.yaml: config key 'train.grad_clip': expected a positive number (> 0), got -1"
    )


# ----------------------------------------------------------------------- run name confinement


@pytest.mark.parametrize(
    "name", ["", " ", ".", "..", "../escape", "a/b", "/tmp/abs", "a\\b", "..\\up", "x/../../y"]
)
def test_run_name_must_stay_inside_the_runs_directory(name):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train": {"run_name": name}})
    message = str(err.value)
    assert message.startswith("config key 'train.run_name': expected one directory name inside ")
    assert message.endswith(f"got {name!r}") and "\n" not in message


@pytest.mark.parametrize("name", ["tiny", "my-run.v2", "run_1", "..dots", "qwen3 0.6b"])
def test_plain_run_names_are_kept(tmp_path, name):
    cfg = config_from_dict({"train": {"run_name": name, "output_dir": str(tmp_path)}})
    assert run_dir(cfg).parent == tmp_path and run_dir(cfg).name == name


# ------------------------------------------------------------------ batch / mesh divisibility


def _cfg(batch, *overrides):
    return config_from_dict({}, [f"data.batch_size={batch}", *overrides])


@pytest.mark.parametrize(
    "batch, mesh, needle",
    [
        (3, ["mesh.data=2", "mesh.fsdp=1", "mesh.tensor=4"],
         "expected a multiple of the data-parallel size 2 (mesh.data=2 x mesh.fsdp=1 on 8 "
         "devices), got 3"),
        (12, ["mesh.data=-1"],
         "expected a multiple of the data-parallel size 8 (mesh.data=-1 -> 8 x mesh.fsdp=1 on 8 "
         "devices), got 12"),
        (6, ["mesh.data=2", "mesh.fsdp=-1"],
         "expected a multiple of the data-parallel size 8 (mesh.data=2 x mesh.fsdp=-1 -> 4 on 8 "
         "devices), got 6"),
    ],
)  # fmt: skip
def test_batch_not_divisible_by_the_data_parallel_axes_is_refused(devices, batch, mesh, needle):
    with pytest.raises(ConfigError) as err:
        check_batch_sharding(_cfg(batch, *mesh), len(devices))
    assert str(err.value) == f"config key 'data.batch_size': {needle}"


def test_microbatches_must_leave_each_microbatch_divisible(devices):
    cfg = _cfg(16, "mesh.data=-1", "train.microbatches=4")  # 4 rows a microbatch, 8 devices
    with pytest.raises(ConfigError) as err:
        check_batch_sharding(cfg, len(devices))
    assert str(err.value) == (
        "config key 'train.microbatches': each of the 4 microbatches of data.batch_size=16 has 4 "
        "rows, not a multiple of the data-parallel size 8 (mesh.data=-1 -> 8 x mesh.fsdp=1 on 8 "
        "devices); use a divisor of 2"
    )
    check_batch_sharding(_cfg(16, "mesh.data=-1", "train.microbatches=2"), len(devices))


@pytest.mark.parametrize(
    "batch, mesh",
    [(8, ["mesh.data=-1"]), (4, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]),
     (3, ["mesh.data=1", "mesh.tensor=-1"]), (16, ["mesh.data=1", "mesh.fsdp=-1"])],
)  # fmt: skip
def test_divisible_batches_pass(devices, batch, mesh):
    check_batch_sharding(_cfg(batch, *mesh), len(devices))


def test_setup_run_checks_the_batch_right_after_the_mesh(tmp_path, monkeypatch, devices):
    """`train` refuses the batch before any state is built (tokenizer stubbed out)."""
    import grc_jax.train.loop as loop

    def no_state(*args, **kwargs):
        raise AssertionError("state built before the batch check")

    monkeypatch.setattr(loop, "_shared_tokenizer", lambda cfg, directory: None)
    monkeypatch.setattr(loop, "create_state", no_state)
    cfg = load_config(TINY, ["data.batch_size=12", f"train.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^config key 'data.batch_size': expected a multiple"):
        loop.train(cfg, quiet=True)


# ----------------------------------------------------------------------------------- the CLI


CLI_BAD = [
    ("train.min_lr_ratio=-5",
     "config key 'train.min_lr_ratio': expected a number in [0, 1], got -5"),
    ("train.grad_clip=-1",
     "config key 'train.grad_clip': expected a positive number (> 0), got -1"),
    ("train.learning_rate=nan", "config key 'train.learning_rate': expected a positive finite "
     "number (> 0), got nan"),
    ("model.max_position_embeddings=-5", "config key 'model.max_position_embeddings': expected "
     "a positive integer (>= 1), got -5"),
    ("train.run_name=../elsewhere", "config key 'train.run_name': expected one directory name"),
]  # fmt: skip


@pytest.fixture
def no_jax_work(monkeypatch):
    """Fail the test if a command gets as far as starting JAX / building a mesh."""

    def started(*args, **kwargs):
        raise AssertionError("JAX work started before the config was checked")

    monkeypatch.setattr("grc_jax.core.distributed.initialize", started)
    monkeypatch.setattr("grc_jax.core.sharding.make_mesh", started)
    monkeypatch.setattr("grc_jax.train.loop.train", started)


@pytest.mark.parametrize("override, needle", CLI_BAD, ids=[c[0] for c in CLI_BAD])
def test_train_cli_refuses_bad_values_in_one_line(override, needle, capsys, no_jax_work):
    capsys.readouterr()
    assert main(["train", "--config", TINY, "--stop-after", "5", override]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("grc train: error: ") and needle in err[0]


def test_eval_cli_refuses_bad_values_before_jax(tmp_path, capsys, no_jax_work):
    save_config(load_config(TINY), tmp_path / "config.yaml")
    capsys.readouterr()
    assert main(["eval", str(tmp_path), "--step", "3", "train.weight_decay=-1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"grc eval: error: {tmp_path / 'config.yaml'}: config key 'train.weight_decay': expected "
        "a non-negative number (>= 0), got -1"
    ]


def test_bad_value_fails_without_importing_jax():
    code = (
        "import sys\nfrom grc_jax.cli import main\n"
        f"rc = main(['train', '--config', {TINY!r}, 'model.init_std=-1'])\n"
        "print(rc, 'jax' in sys.modules)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.stdout.split() == ["2", "False"], r.stderr
    assert r.stderr.splitlines() == [
        f"grc train: error: {TINY}: config key 'model.init_std': expected a positive number "
        "(> 0), got -1"
    ]


# ------------------------------------------------------------- overrides after the options


@pytest.mark.parametrize(
    "argv, overrides",
    [
        (["train", "--config", "c.yaml", "--stop-after", "5", "train.steps=10"],
         ["train.steps=10"]),
        (["train", "a.b=1", "--config", "c.yaml", "c.d=2", "--stop-after", "5", "a.b=3"],
         ["a.b=1", "c.d=2", "a.b=3"]),
        (["train", "--stop-after", "5", "--config", "c.yaml"], []),
        (["eval", "runs/x", "--step", "3", "data.seq_len=64", "--out", "m.json", "a.b=1"],
         ["data.seq_len=64", "a.b=1"]),
        (["aot", "--config", "c.yaml", "--topology", "v4-8", "data.batch_size=4"],
         ["data.batch_size=4"]),
    ],
)  # fmt: skip
def test_overrides_are_accepted_anywhere_in_order(argv, overrides):
    args = parse_args(build_parser(argv[0]), argv)
    assert args.overrides == overrides


def test_overrides_after_stop_after_reach_the_run(tmp_path, monkeypatch):
    seen = {}

    def train(cfg, max_steps=None, hooks=()):
        seen.update(steps=cfg.train.steps, max_steps=max_steps, layers=cfg.model.n_layers)
        return {}

    monkeypatch.setattr("grc_jax.train.loop.train", train)
    argv = ["train", "--config", TINY, "--no-distributed", "--stop-after", "5", "train.steps=10",
            f"train.output_dir={tmp_path}", "model.n_layers=2"]  # fmt: skip
    assert main(argv) == 0
    assert seen == {"steps": 10, "max_steps": 5, "layers": 2}


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--config", TINY, "--stop-after", "5", "--bogus", "train.steps=3"],
        ["train", "--config", TINY, "train.steps=3", "--stop-after", "5", "--bogus=1"],
        ["eval", "runs/x", "a.b=1", "--nope"],
        ["data", "synth", "stray"],  # a command without overrides keeps refusing stray words
    ],
)
def test_unknown_flags_stay_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
