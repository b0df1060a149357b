"""Where models live on disk: run directories, their Orbax checkpoints, and import directories.

Training and inference both go through this module:

- a run directory (`<train.output_dir>/<train.run_name>`: `config.yaml`, `checkpoints/<step>/`
  holding `state` (train state) and `data` (data-iterator state, one per process), a tokenizer);
- an import directory (`grc import-hf` output: `config.yaml`, `params/`, `import_info.json`,
  tokenizer files), the imported, not yet GRC-trained model.

Saves are asynchronous and keep the newest `train.keep_checkpoints`; each step carries an
integrity manifest (`grc_manifest.json`, `grc_jax.integrity`). Restoring never falls back to a
fresh start, to random weights or to a subset of the parameters: a checkpoint that exists but
cannot be read, whose files do not match its manifest, whose restored parameters are not finite,
or whose parameter tree is not the config's is an error naming the step and what is wrong.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from grc_jax.adapter import base_cache_dir, check_base, is_adapter_dir, load_adapter, read_info
from grc_jax.core.config import Config, load_config
from grc_jax.core.errors import CheckpointError, MissingPathError, ModelLoadError
from grc_jax.core.processes import gather_json
from grc_jax.core.trees import path_names
from grc_jax.data.tokenizer import Tokenizer, load_tokenizer
from grc_jax.integrity import (
    check_step,
    damaged_message,
    nonfinite_message,
    nonfinite_paths,
    warn_unverified,
    write_manifest,
)
from grc_jax.model.params import GRCParams, init_grc_params
from grc_jax.model.transformer import abstract_params


def run_dir(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) / cfg.train.run_name


class RunCheckpoints:
    """The checkpoints of one run directory (`<run>/checkpoints/<step>/{state,data}`), each with
    its integrity manifest (`grc_jax.integrity`), written from Orbax's commit thread just before
    the step is published: saving never waits for the hashing, and no committed step lacks it."""

    def __init__(self, directory: str | Path, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self._committing: collections.deque[int] = collections.deque()  # saved, not yet sealed
        self._async = async_save
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal)
            if async_save
            else None,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def _seal(self) -> None:
        """Orbax's commit thread, on process 0, after the oldest pending save's items are
        finalized and before its temporary directory is renamed to `<step>`: the manifest."""
        step = self._committing.popleft()
        found = list(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
        if len(found) != 1:
            found = [self.directory / str(step)] if (self.directory / str(step)).is_dir() else []
        if not found:
            raise RuntimeError(f"checkpoint step {step}: no directory to seal in {self.directory}")
        write_manifest(found[0], step)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        """Save `state` and this process's data-iterator state (call on every process: with
        several, their data states are gathered into the one `data` item, `pack_data_states`)."""
        data = pack_data_states(gather_json(data_state))
        sealing = self._async and jax.process_index() == 0
        if sealing:
            self._committing.append(step)
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)
                ),
            )
        except BaseException:
            if sealing and self._committing and self._committing[-1] == step:
                self._committing.pop()
            raise
        if not self._async and jax.process_index() == 0:
            write_manifest(self.directory / str(step), step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def check(self, step: int) -> None:
        """Raise `CheckpointError` unless checkpoint `step`'s files match its manifest; warn when
        it predates manifests."""
        steps = self.all_steps()
        verdict = check_step(self.directory, step, steps)
        if verdict.status == "damaged":
            raise CheckpointError(damaged_message(self.directory, step, steps, verdict.problem))
        if verdict.status == "unverified":
            warn_unverified(self.directory, step)

    def newest_verified_step(self) -> int | None:
        """The newest step whose files match its manifest (pending saves finished first)."""
        self.wait()
        steps = self.all_steps()
        for step in reversed(steps):
            if check_step(self.directory, step, steps).status == "verified":
                return step
        return None

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict[str, Any], int]:
        """Restore (state, this process's data-iterator state, step); `abstract_state` carries
        target shardings. The step's files are checked against its manifest first, then that it
        was saved by as many processes as this run has (`unpack_data_state`), the restored floats
        last."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint to resume from in {self.directory}")
        if step not in self.all_steps():
            raise CheckpointError(
                f"checkpoint step {step} does not exist in {self.directory}; "
                f"available: {self.all_steps()}"
            )
        self.check(step)
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state
        )
        try:
            # The small data item first: a process count other than the checkpoint's is refused
            # before the train state is read.
            only_data = ocp.args.Composite(data=ocp.args.JsonRestore())
            data = self.manager.restore(step, args=only_data)["data"]
            data_state = unpack_data_state(data, self.directory / str(step))
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )
        except CheckpointError:
            raise
        except Exception as e:  # orbax raises many types for unreadable/corrupt files
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be restored "
                f"({type(e).__name__}: {e}); refusing to start fresh over it"
            ) from e
        bad = nonfinite_paths(restored["state"])
        if bad:
            steps = self.all_steps()
            raise CheckpointError(nonfinite_message(self.directory, step, steps, bad))
        return restored["state"], data_state, step

    def set_aside_after(self, step: int) -> list[int]:
        """Move the checkpoints newer than `step` to `<run>/checkpoints.set_aside/<step>` (process
        0; call on every process: the others wait for it) so that training from `step` can save
        them again; the steps moved."""
        newer = [s for s in self.all_steps() if s > step]
        if newer and jax.process_index() == 0:
            aside = self.directory.parent / f"{self.directory.name}.set_aside"
            aside.mkdir(exist_ok=True)
            for s in newer:
                target = aside / str(s)
                n = 1
                while target.exists():
                    target, n = aside / f"{s}.{n}", n + 1
                os.replace(self.directory / str(s), target)
        if newer and jax.process_count() > 1:
            from jax.experimental.multihost_utils import sync_global_devices

            sync_global_devices("grc_jax: newer checkpoints set aside")
        if newer:
            self.manager.reload()
        return newer

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# With several processes the checkpoint's `data` item holds every process's data-iterator state
# (each reads its own share of the records); with one, the state itself, as always.
_PER_PROCESS = "per_process"


def pack_data_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The `data` item of a checkpoint from the data-iterator states of every process (in process
    order): the state itself for one process, else `{"process_count": n, "per_process": [...]}`."""
    if len(states) == 1:
        return states[0]
    return {"process_count": len(states), _PER_PROCESS: states}


def unpack_data_state(
    data: dict[str, Any], where: Path, index: int | None = None, count: int | None = None
) -> dict[str, Any]:
    """Process `index`'s (default: this one's) data-iterator state from a checkpoint's `data`
    item; a `CheckpointError` when it was saved by another number of processes than `count`
    (default: this run's)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    saved = data.get("process_count", 1) if _PER_PROCESS in data else 1
    if saved != count:
        raise CheckpointError(
            f"checkpoint {where} was saved by {saved} process(es), this run has {count}: each "
            "process reads and checkpoints its own share of the training records "
            f"(docs/multihost.md), so the run resumes only with {saved} process(es); rerun it "
            "with that many, or train a new run (another train.run_name)"
        )
    return data[_PER_PROCESS][index] if count > 1 else data


def checkpoint_steps(run: str | Path) -> list[int]:
    """Steps of the committed checkpoints of a run directory (ascending)."""
    directory = Path(run) / "checkpoints"
    if not directory.is_dir():
        return []
    ckpts = RunCheckpoints(directory, keep=1_000_000, async_save=False)
    try:
        return sorted(ckpts.all_steps())
    finally:
        ckpts.close()


def _on_one_device(shapes: Any) -> Any:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)


def _shape_table(tree: Any) -> dict[str, tuple[int, ...]]:
    return {
        ".".join(path_names(path)): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _param_tree_mismatch(saved: Any, expected: Any) -> list[str]:
    """The differences between the param shapes in a checkpoint's metadata and the config's."""
    have, want = _shape_table(saved), _shape_table(expected)
    diffs = [f"params.{k} (config only)" for k in sorted(want.keys() - have.keys())]
    diffs += [f"params.{k} (checkpoint only)" for k in sorted(have.keys() - want.keys())]
    diffs += [
        f"params.{k}: {have[k]} in the checkpoint, {want[k]} from the config"
        for k in sorted(want.keys() & have.keys())
        if have[k] != want[k]
    ]
    return diffs


def restore_params(cfg: Config, run: str | Path, step: int | None = None) -> tuple[GRCParams, int]:
    """The params (no optimizer state) of a run's checkpoint `step` (default: the newest).

    The step's files are checked against its manifest, its param tree (keys and shapes, from the
    checkpoint's metadata) must be the one `cfg` builds, and every restored parameter must be
    finite; otherwise a `CheckpointError` (damaged files, non-finite params) or `ModelLoadError`
    (a param tree that is not the config's) names what is wrong.
    """
    run = Path(run)
    steps = checkpoint_steps(run)
    if not steps:
        raise ModelLoadError(
            f"run {str(run)!r} has no checkpoint in {str(run / 'checkpoints')!r}; train it first: "
            "refusing to use random weights"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ModelLoadError(
            f"run {str(run)!r} has no checkpoint at step {step}; available: {steps}"
        )
    checkpoints = (run / "checkpoints").absolute()
    verdict = check_step(checkpoints, step, steps)
    if verdict.status == "damaged":
        raise CheckpointError(damaged_message(checkpoints, step, steps, verdict.problem))
    if verdict.status == "unverified":
        warn_unverified(checkpoints, step)
    shapes = jax.eval_shape(lambda: init_grc_params(cfg, jax.random.key(0)))
    path = checkpoints / str(step) / "state"
    handler = ocp.PyTreeCheckpointHandler()
    try:
        saved = handler.metadata(path).tree["params"]
    except Exception as e:  # orbax raises many types for unreadable metadata
        raise CheckpointError(
            f"checkpoint {str(path.parent)!r}: its metadata cannot be read "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    finally:
        handler.close()
    diffs = _param_tree_mismatch(saved, shapes)
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise ModelLoadError(
            f"checkpoint {str(path.parent)!r} does not hold the params of the run's config.yaml: "
            f"{'; '.join(diffs[:3])}{more}; restore the config.yaml the run was trained with"
        )
    target = {"params": _on_one_device(shapes)}
    args = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        # The params only (checked above to be the checkpoint's whole param tree): no optimizer
        # state is read or allocated.
        partial_restore=True,
    )
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(path, args=args)
    except Exception as e:  # orbax raises many types for unreadable/mismatched checkpoints
        raise ModelLoadError(
            f"checkpoint {str(path.parent)!r} cannot be restored with the run's config.yaml "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    bad = nonfinite_paths(restored["params"], "params")
    if bad:
        raise CheckpointError(nonfinite_message(checkpoints, step, steps, bad))
    return restored["params"], step


def save_params(params: Any, path: Path) -> None:
    """Write transformer params as one Orbax checkpoint (an import directory's `params/`)."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path.absolute(), params)
    ckptr.wait_until_finished()
    ckptr.close()


def load_imported(out: str | Path) -> tuple[Config, Any]:
    """(Config, float32 transformer params) of a `grc import-hf` output directory."""
    out = Path(out)
    cfg = load_config(out / "config.yaml")
    path = (out / "params").absolute()
    if not path.is_dir():
        raise MissingPathError(f"{str(path)!r} does not exist (not a grc import directory?)")
    shapes, _ = abstract_params(cfg.model, cfg.grc)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path, _on_one_device(shapes))
    return cfg, params


def model_kind(path: Path) -> str:
    """'run' or 'import'; raises a `ModelLoadError` naming what is missing otherwise."""
    if not path.exists():
        raise MissingPathError(f"model path {str(path)!r} does not exist")
    if not path.is_dir() or not (path / "config.yaml").is_file():
        raise ModelLoadError(
            f"model path {str(path)!r} is neither a `grc train` run directory, a "
            "`grc import-hf` directory nor a `grc adapter` directory (expected a directory with "
            "config.yaml)"
        )
    if is_adapter_dir(path):
        return "adapter"
    if (path / "checkpoints").is_dir():
        return "run"
    if (path / "params").is_dir():
        return "import"
    if (path / "tokenizer.model").is_file() or (path / "metrics.jsonl").is_file():
        raise ModelLoadError(
            f"run {str(path)!r} has no checkpoints/ directory (the run never saved a checkpoint); "
            "train it first: refusing to use random weights"
        )
    raise ModelLoadError(
        f"model path {str(path)!r} is neither a `grc train` run directory (no checkpoints/) nor a "
        "`grc import-hf` directory (no params/)"
    )


def model_tokenizer(cfg: Config, path: Path) -> Tokenizer:
    """The tokenizer a model was trained with; same precedence as training, never trained here."""
    candidates: list[Path] = []
    if cfg.data.tokenizer:
        given = Path(cfg.data.tokenizer)
        # Paths in a config are relative to where it was written from; also try the model dir.
        candidates += [given, path / given.name]
    if cfg.train.init_from:
        candidates.append(Path(cfg.train.init_from))
    candidates += [path / "tokenizer.model", path / "tokenizer.json"]
    for c in candidates:
        if c.exists():
            tok = load_tokenizer(c)
            break
    else:
        tried = ", ".join(repr(str(c)) for c in candidates)
        raise ModelLoadError(f"model {str(path)!r}: no tokenizer found (tried {tried})")
    if tok.vocab_size > cfg.model.vocab_size:
        raise ModelLoadError(
            f"model {str(path)!r}: tokenizer {str(c)!r} has {tok.vocab_size} tokens but "
            f"model.vocab_size={cfg.model.vocab_size}"
        )
    return tok


def load_model(
    path: str | Path, step: int | None = None, base: str | Path | None = None
) -> tuple[Config, GRCParams, Tokenizer]:
    """(config, params, tokenizer) of a run, import or adapter directory.

    Args:
      path: `runs/<name>` written by `grc train`, a `grc import-hf` output directory, or a
        `grc adapter` directory.
      step: checkpoint step of a run (default: the newest); not allowed for the others.
      base: an adapter's base, a `grc import-hf` directory of exactly the files the adapter
        records (default: where `grc_jax.convert.adapter.ensure_base` prepares it).
    """
    path = Path(path)
    kind = model_kind(path)
    if kind == "adapter":
        if step is not None:
            raise ModelLoadError(f"{str(path)!r} is an adapter: it has no steps (got step={step})")
        return _load_adapter(path, base)
    cfg = load_config(path / "config.yaml")
    if kind == "run":
        params, _ = restore_params(cfg, path, step)
    else:
        if step is not None:
            raise ModelLoadError(
                f"{str(path)!r} is an import directory: it has no steps (got step={step})"
            )
        cfg, model_params = load_imported(path)
        # The embedding head a GRC run from this import starts with (same seed as training).
        full = init_grc_params(cfg, jax.random.key(cfg.train.seed), model_params)
        params = GRCParams(model=full.model, head=full.head)
    return cfg, params, model_tokenizer(cfg, path)


def _load_adapter(path: Path, base: str | Path | None) -> tuple[Config, GRCParams, Tokenizer]:
    info = read_info(path)
    if base is None:
        cfg = load_config(path / "config.yaml")
        base = base_cache_dir(info, cfg.model.scan_layers, cfg.grc.num_latents)
        if not (base / "import_info.json").is_file():
            raise ModelLoadError(
                f"adapter {str(path)!r}: its base model is not prepared at {str(base)!r}; the "
                "`grc` commands prepare it (or call grc_jax.convert.adapter.ensure_base)"
            )
    check_base(path, base, info)
    base_cfg, base_model = load_imported(base)
    cfg, params = load_adapter(path, base_cfg, base_model)
    return cfg, params, model_tokenizer(base_cfg, Path(base))
