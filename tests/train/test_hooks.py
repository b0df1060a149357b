"""Training hooks one by one (schedules, finite check, checkpoint with preemption, metrics log,
periodic eval, the periodic export supplied by `grc_jax.convert`), then all of them in `train`:
metrics fetched only when a hook due reads them, one logger opened and closed once."""

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tqdm import tqdm

from grc_jax.checkpoints import RunCheckpoints
from grc_jax.convert.export import export_hooks
from grc_jax.core.config import Config, GRCConfig, ModelConfig, TrainConfig, load_config
from grc_jax.core.errors import ExportError, NonFiniteLossError
from grc_jax.data.pipeline import RecordParser, SkippedLine
from grc_jax.data.synth import synthesize
from grc_jax.model.params import init_grc_params
from grc_jax.train import loop
from grc_jax.train.hooks import (
    CheckFinite,
    Hook,
    Logger,
    LogMetrics,
    PeriodicEval,
    SaveCheckpoint,
    Schedule,
    Tick,
    default_hooks,
)
from tests.helpers import TINY_MODEL, word_tokenizer

ROOT = Path(__file__).resolve().parents[2]
CFG = TrainConfig(log_every=5, checkpoint_every=3, eval_every=4)
METRICS = {
    "loss/total": 3.0, "loss/gen": 1.25, "loss/rep": 0.75, "loss/comp": 1.0, "grad_norm": 2.0,
    "lr": 1e-3, "params_finite": 1.0,
}  # fmt: skip


def fired(schedule: Schedule, end: int, preempt_at: int | None = None) -> list[int]:
    return [s for s in range(1, end + 1) if schedule.fires(s, end, s == preempt_at)]


def drive(
    run, hooks, end, preempt_at=None, metrics=lambda step: METRICS, tokens_per_step=100,
    train_step=lambda step: None,
):  # fmt: skip
    """The loop's dispatch without a model: steps 1..end (until a hook stops it), each a call of
    `train_step(step)` followed by the hooks due, with metrics only when one of them needs them.
    The last step taken."""
    for hook in hooks:
        hook.start(run)
    for step in range(1, end + 1):
        train_step(step)
        preempted = step == preempt_at
        due = [h for h in hooks if h.schedule.fires(step, end, preempted)]
        m = dict(metrics(step)) if any(h.needs_metrics for h in due) else None
        tick = Tick(step, end, preempted, tokens_per_step * step, m)
        for hook in due:
            hook(run, tick)
        if tick.stop:
            break
    return step


class Record(Hook):
    """Records (step, metrics fetched?, state step) of each call."""

    def __init__(self, schedule, needs_metrics=False):
        super().__init__(schedule)
        self.needs_metrics = needs_metrics
        self.ticks = []

    def __call__(self, run, tick):
        state_step = getattr(run.state, "step", None)
        state_step = None if state_step is None else int(state_step)
        self.ticks.append((tick.step, tick.metrics is not None, state_step))


def _ckpt_run(tmp_path):
    state = {"w": jnp.arange(3.0)}
    position = {"step": 0}
    data_iter = SimpleNamespace(get_state=lambda: dict(position))
    ckpts = RunCheckpoints(tmp_path / "checkpoints", keep=10)
    return SimpleNamespace(ckpts=ckpts, state=state, data_iter=data_iter, position=position)


# --------------------------------------------------------------------------------- schedules


def test_schedule_steps():
    assert fired(Schedule(every=3), 10) == [3, 6, 9]
    assert fired(Schedule(every=3, at_end=True), 10) == [3, 6, 9, 10]
    assert fired(Schedule(every=3, at_end=True), 9) == [3, 6, 9]
    assert fired(Schedule(every=(3, 4)), 12) == [3, 4, 6, 8, 9, 12]
    assert fired(Schedule(every=0, at_end=True), 5) == [5]
    assert fired(Schedule(every=(0, 0)), 5) == []
    assert fired(Schedule(every=3, on_preemption=True), 10, preempt_at=4) == [3, 4, 6, 9]
    assert fired(Schedule(every=2, skip_last=True), 8) == [2, 4, 6]
    assert fired(Schedule(every=2, skip_last=True), 8, preempt_at=4) == [2, 6]


def test_default_hooks_schedules_and_order():
    extra = Hook(Schedule(every=2))
    hooks = default_hooks(CFG, [extra])
    assert [type(h) for h in hooks] == [CheckFinite, LogMetrics, SaveCheckpoint, Hook, PeriodicEval]
    steps = [fired(h.schedule, 12) for h in hooks]
    # Metrics at log steps (5), checkpoint steps (3) and the end; eval never on the last step.
    assert steps == [[3, 5, 6, 9, 10, 12]] * 2 + [[3, 6, 9, 12], [2, 4, 6, 8, 10, 12], [4, 8]]
    preempted = [fired(h.schedule, 12, preempt_at=7) for h in hooks]
    assert preempted[:3] == [[3, 5, 6, 7, 9, 10, 12]] * 2 + [[3, 6, 7, 9, 12]]
    assert preempted[4] == [4, 8]  # the loop stops at 7; a later eval never comes
    assert [h.needs_metrics for h in hooks] == [True, True, False, False, False]


# ------------------------------------------------------------------------------ finite check


def test_check_finite_stops_on_nan_loss_and_bad_update(tmp_path):
    run = _ckpt_run(tmp_path)
    run.ckpts.save(2, run.state, {"step": 2})
    run.ckpts.wait()
    check = default_hooks(CFG)[0]
    assert isinstance(check, CheckFinite)
    check(run, Tick(3, 12, False, 0, dict(METRICS)))  # finite: nothing happens
    nan = dict(METRICS, **{"loss/total": float("nan"), "loss/gen": float("nan")})
    with pytest.raises(NonFiniteLossError) as e:
        check(run, Tick(3, 12, False, 0, nan))
    assert str(e.value) == (
        "non-finite loss at step 3 (gen=nan, rep=0.75, comp=1.0); stopping. The last good "
        f"checkpoint (step 2) in {tmp_path / 'checkpoints'} is intact; lower "
        "train.learning_rate or check the data"
    )
    with pytest.raises(NonFiniteLossError, match=r"non-finite parameter update at step 5 .*"
                       r"last good checkpoint \(step 2\)"):  # fmt: skip
        check(run, Tick(5, 12, False, 0, dict(METRICS, params_finite=0.0)))
    with pytest.raises(NonFiniteLossError, match="step 6"):  # 4 is not checked: no metrics

        def metrics(step):
            return dict(METRICS, params_finite=0.0) if step in (4, 6) else METRICS

        drive(run, default_hooks(CFG)[:1], 12, metrics=metrics)
    run.ckpts.close()


# -------------------------------------------------------------------------------- checkpoint


def test_checkpoint_hook_saves_at_its_steps_and_at_the_end(tmp_path):
    run = _ckpt_run(tmp_path)
    save = default_hooks(CFG)[2]

    def train_step(step):
        run.position["step"] = step  # the data position the loop would be at
        run.state = {"w": jnp.arange(3.0) + step}

    assert drive(run, [save], 7, train_step=train_step) == 7
    run.ckpts.close()
    ckpts = RunCheckpoints(tmp_path / "checkpoints", keep=10)
    assert ckpts.all_steps() == [3, 6, 7]
    state, data, step = ckpts.restore(None, {"w": jnp.zeros(3)})
    ckpts.close()
    assert step == 7 and data == {"step": 7}
    np.testing.assert_array_equal(state["w"], np.arange(3.0) + 7)


def test_checkpoint_hook_on_preemption_saves_then_stops(tmp_path, capsys):
    run = _ckpt_run(tmp_path)
    spy = Record(Schedule(every=1))
    check, _log, save, *_ = default_hooks(CFG)
    assert drive(run, [check, save, spy], 100, preempt_at=4) == 4
    assert [t[0] for t in spy.ticks] == [1, 2, 3, 4]  # the step's hooks run; then the loop ends
    run.ckpts.close()
    assert RunCheckpoints(tmp_path / "checkpoints", keep=10).all_steps() == [3, 4]
    assert "preemption notice: saved checkpoint 4, stopping" in capsys.readouterr().out


# ------------------------------------------------------------------------------ metrics log


def test_log_hook_writes_metrics_rows_and_tensorboard(tmp_path):
    logger = Logger(tmp_path / "tb", True)
    bar = tqdm(total=7, disable=True)
    run = SimpleNamespace(
        directory=tmp_path, logger=logger, bar=bar, start=0, flops_per_step=1e6, peak_flops=1e9,
        parser=RecordParser(False), source=SimpleNamespace(records_read=0),
    )  # fmt: skip
    log = default_hooks(CFG)[1]

    def metrics(step):
        return dict(METRICS, **{"loss/total": 3.0 - step / 10})

    drive(run, [log], 7, metrics=metrics)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 5, 6, 7]
    for r in rows:
        assert list(r) == [
            "step", *METRICS, "tokens_per_s", "step_time_s", "mfu", "data/bad_lines_skipped",
            "data/records_read",
        ]  # fmt: skip
        assert r["data/bad_lines_skipped"] == 0
        assert r["loss/total"] == pytest.approx(3.0 - r["step"] / 10)
        assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0 and r["mfu"] > 0
    assert bar.postfix is not None and "gen=1.250" in bar.postfix
    assert "skipped" not in bar.postfix  # shown once a record is skipped
    assert logger.writer is not None  # the hook leaves the logger open: `train` closes it
    logger.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_log_hook_rates_cover_the_steps_since_the_previous_row(tmp_path, monkeypatch):
    clock = iter([10.0, 14.0, 15.0])  # start, step 4, step 5
    monkeypatch.setattr("grc_jax.train.hooks.time.perf_counter", lambda: next(clock))
    run = SimpleNamespace(
        directory=tmp_path, logger=Logger(tmp_path, False), bar=tqdm(disable=True), start=2,
        flops_per_step=2e6, peak_flops=1e6, parser=RecordParser(False),
        source=SimpleNamespace(records_read=0),
    )  # fmt: skip
    log = LogMetrics(Schedule(every=(4, 5)))
    log.start(run)
    log(run, Tick(4, 5, False, 800, dict(METRICS)))  # 2 steps, 800 tokens in 4 s
    log(run, Tick(5, 5, False, 1000, dict(METRICS)))  # 1 step, 200 tokens in 1 s
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["tokens_per_s"], r["step_time_s"], r["mfu"]) for r in rows] == [
        (200.0, 2.0, 1.0),
        (200.0, 1.0, 2.0),
    ]


class RecordingLogger(Logger):
    """TensorBoard scalars kept in memory: {tag: [(step, value), ...]}."""

    def __init__(self):
        super().__init__(Path(), False)
        self.logged: dict[str, list] = {}

    def scalars(self, step, values):
        for k, v in values.items():
            self.logged.setdefault(k, []).append((step, v))


def test_log_hook_shows_skipped_records_and_prints_the_first_once(tmp_path, capsys):
    parser = RecordParser(True)
    run = SimpleNamespace(
        directory=tmp_path, logger=RecordingLogger(), bar=tqdm(total=4, disable=True), start=0,
        flops_per_step=1e6, peak_flops=1e9, parser=parser, source=SimpleNamespace(records_read=0),
    )  # fmt: skip
    # (file:line, first time met) of the records the data iterator skips before each step.
    skips = {2: [("a:3", True)], 3: [("a:9", True), ("a:3", False)],
             4: [(f"b:{i}", True) for i in range(9)]}  # fmt: skip

    def train_step(step):
        for where, new in skips.get(step, []):
            parser.skip(SkippedLine(where, f"{where}: not valid JSON"), new=new)

    capsys.readouterr()
    drive(run, [LogMetrics(Schedule(every=1))], 4, train_step=train_step)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["data/bad_lines_skipped"] for r in rows] == [0, 1, 2, 11]
    assert run.logger.logged["data/bad_lines_skipped"] == [(1, 0), (2, 1), (3, 2), (4, 11)]
    assert "skipped=11" in run.bar.postfix
    # The first five, each printed once when first met; then a line saying the rest are counted.
    assert capsys.readouterr().out.splitlines() == [
        "skipped (data.skip_bad_lines): a:3: not valid JSON",
        "skipped (data.skip_bad_lines): a:9: not valid JSON",
        *[f"skipped (data.skip_bad_lines): b:{i}: not valid JSON" for i in range(3)],
        "further skipped records are counted only (data/bad_lines_skipped)",
    ]


# ---------------------------------------------------------------------------------- eval


class CountingEvaluator:
    """`Evaluator.run`'s contract: params in, a flat dict of floats out."""

    def __init__(self):
        self.calls = 0

    def run(self, params):
        self.calls += 1
        return {"retrieval/ndcg@10": float(np.sum(params["w"])), "n": float(self.calls)}


def test_eval_hook_writes_step_files_and_skips_the_last_step(tmp_path):
    (tmp_path / "eval").mkdir()
    logger = Logger(tmp_path / "tb", True)
    run = SimpleNamespace(directory=tmp_path, logger=logger, evaluator=CountingEvaluator(),
                          state=SimpleNamespace(params={"w": jnp.ones(3)}))  # fmt: skip
    evaluate = default_hooks(CFG)[-1]
    assert isinstance(evaluate, PeriodicEval)
    drive(run, [evaluate], 8)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["step_4.json"]
    assert json.loads((tmp_path / "eval/step_4.json").read_text()) == {
        "retrieval/ndcg@10": 3.0,
        "n": 1.0,
    }
    drive(run, [evaluate], 12, preempt_at=8)
    assert run.evaluator.calls == 2  # step 4 again; not at the preempted step 8
    logger.close()


# -------------------------------------------------------------------------------- export


def test_export_hooks_export_at_their_steps(tmp_path):
    model = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                        head_dim=8, d_ff=64)  # fmt: skip
    cfg = Config(model=model, grc=GRCConfig(num_latents=4), train=TrainConfig(export_every=2))
    assert export_hooks(Config(model=model, grc=GRCConfig(num_latents=4))) == []
    with pytest.raises(ExportError, match="qkv_bias"):  # refused before any training
        export_hooks(Config(model=ModelConfig(family="llama", qkv_bias=True), train=cfg.train))
    hooks = export_hooks(cfg)
    assert len(hooks) == 1 and not hooks[0].needs_metrics
    run = SimpleNamespace(
        cfg=cfg,
        directory=tmp_path / "run",
        tok=word_tokenizer(tmp_path / "tok", "the cat sat on a mat dogs run fast".split()),
        state=SimpleNamespace(params=init_grc_params(cfg, jax.random.key(0))),
    )
    drive(run, hooks, 5)
    assert sorted(p.name for p in (tmp_path / "run/export").iterdir()) == ["step_2", "step_4"]
    grc = json.loads((tmp_path / "run/export/step_4/grc_config.json").read_text())
    assert grc["source"] == {"path": str(run.directory.absolute()), "kind": "run", "step": 4}
    assert (tmp_path / "run/export/step_2/model.safetensors").is_file()


# ----------------------------------------------------------------------- in the real loop

TINY = [
    *TINY_MODEL, "train.warmup_steps=1", "train.steps=4", "train.log_every=3",
    "train.checkpoint_every=4", "train.eval_every=2",
]  # fmt: skip


@pytest.mark.slow  # long: `make test-all` (README, Tests)
def test_train_runs_hooks_fetches_metrics_only_when_needed_and_closes_logger_once(
    tmp_path, monkeypatch
):
    events = []

    class CountingLogger(Logger):
        def __init__(self, directory, enabled):
            events.append("open")
            super().__init__(directory, enabled)

        def scalars(self, step, values):
            events.append(("scalars", step, sorted({k.split("/")[0] for k in values})))
            super().scalars(step, values)

        def close(self):
            events.append("close")
            super().close()

    monkeypatch.setattr(loop, "Logger", CountingLogger)
    data = tmp_path / "data"
    synthesize(data, seed=0, queries_per_doc=1)
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        *TINY, f"data.train_path={data}/train.jsonl", f"data.eval_path={data}/validation.jsonl",
        f"train.output_dir={tmp_path}", "train.run_name=hooks",
    ])  # fmt: skip
    every = Record(Schedule(every=1))
    asks = Record(Schedule(every=2), needs_metrics=True)
    result = loop.train(cfg, quiet=True, hooks=[every, asks])
    assert set(result) == {
        "step", "bad_lines_skipped", "records_read", "final", "untrained", "state"
    }  # fmt: skip
    assert result["step"] == 4
    # Metrics leave the device at log/checkpoint steps (3, 4) and where a hook asks (2, 4).
    assert every.ticks == [(1, False, 1), (2, True, 2), (3, True, 3), (4, True, 4)]
    assert asks.ticks == [(2, True, 2), (4, True, 4)]
    run = tmp_path / "hooks"
    assert sorted(json.loads(line)["step"] for line in (run / "metrics.jsonl").open()) == [3, 4]
    assert sorted(p.name for p in (run / "eval").iterdir()) == [
        "final.json",
        "step_2.json",
        "untrained.json",
    ]
    # One logger: opened once, the final eval's scalars through it, then closed once.
    assert events.count("open") == 1 and events.count("close") == 1
    assert events[0] == "open" and events[1] == ("scalars", 0, ["eval"])
    assert events[-2:] == [("scalars", 4, ["eval"]), "close"]
