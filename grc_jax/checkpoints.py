"""Where models live on disk: run directories, their Orbax checkpoints, and import directories.

Training and inference both go through this module:

- a run directory (`<train.output_dir>/<train.run_name>`: `config.yaml`, `checkpoints/<step>/`
  holding `state` (train state) and `data` (data-iterator state), a tokenizer);
- an import directory (`grc import-hf` output: `config.yaml`, `params/`, `import_info.json`,
  tokenizer files), the imported, not yet GRC-trained model.

Saves are asynchronous and keep the newest `train.keep_checkpoints`. Restoring never falls back to
a fresh start or to random weights: a checkpoint that exists but cannot be read is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from grc_jax.core.config import Config, load_config
from grc_jax.core.errors import CheckpointError, MissingPathError, ModelLoadError
from grc_jax.data.tokenizer import Tokenizer, load_tokenizer
from grc_jax.model.params import GRCParams, init_grc_params
from grc_jax.model.transformer import abstract_params


def run_dir(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) / cfg.train.run_name


class RunCheckpoints:
    """The checkpoints of one run directory (`<run>/checkpoints/<step>/{state,data}`)."""

    def __init__(self, directory: str | Path, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict[str, Any], int]:
        """Restore (state, data-iterator state, step); `abstract_state` carries target shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint to resume from in {self.directory}")
        if step not in self.all_steps():
            raise CheckpointError(
                f"checkpoint step {step} does not exist in {self.directory}; "
                f"available: {self.all_steps()}"
            )
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state
        )
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # orbax raises many types for unreadable/corrupt files
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be restored "
                f"({type(e).__name__}: {e}); refusing to start fresh over it"
            ) from e
        return restored["state"], restored["data"], step

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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


def restore_params(cfg: Config, run: str | Path, step: int | None = None) -> tuple[GRCParams, int]:
    """The params (no optimizer state) of a run's checkpoint `step` (default: the newest)."""
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
    shapes = jax.eval_shape(lambda: init_grc_params(cfg, jax.random.key(0)))
    target = {"params": _on_one_device(shapes)}
    path = (run / "checkpoints" / str(step) / "state").absolute()
    args = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,  # the params only: no optimizer state is read or allocated
    )
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(path, args=args)
    except Exception as e:  # orbax raises many types for unreadable/mismatched checkpoints
        raise ModelLoadError(
            f"checkpoint {str(path.parent)!r} cannot be restored with the run's config.yaml "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
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
            f"model path {str(path)!r} is neither a `grc train` run directory nor a "
            "`grc import-hf` directory (expected a directory with config.yaml)"
        )
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


def load_model(path: str | Path, step: int | None = None) -> tuple[Config, GRCParams, Tokenizer]:
    """(config, params, tokenizer) of a run or import directory.

    Args:
      path: `runs/<name>` written by `grc train`, or a `grc import-hf` output directory.
      step: checkpoint step of a run (default: the newest); not allowed for an import directory.
    """
    path = Path(path)
    kind = model_kind(path)
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
