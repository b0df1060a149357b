"""Load a model for inference: a `grc train` run directory or a `grc import-hf` output directory.

A run directory (`runs/<name>`: `config.yaml`, `checkpoints/<step>/`, tokenizer) gives the params of
its newest checkpoint (or of `step`); only the params are read from the checkpoint, not the
optimizer state. An import directory (`config.yaml`, `params/`, `import_info.json`) gives the
imported, not yet GRC-trained model with the embedding head a training run would start from.
Nothing here ever falls back to random weights or trains a tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from grc_jax.config import Config, load_config
from grc_jax.data.tokenizer import Tokenizer, load_tokenizer


class ModelLoadError(ValueError):
    """A model path is missing, is not a run/import directory, or has no usable checkpoint."""


def _kind(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
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


def _tokenizer(cfg: Config, path: Path) -> Tokenizer:
    """The tokenizer the model was trained with; same precedence as training, never trained here."""
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


def checkpoint_steps(run: str | Path) -> list[int]:
    """Steps of the committed checkpoints of a run directory (ascending)."""
    from grc_jax.train.checkpoint import RunCheckpoints

    directory = Path(run) / "checkpoints"
    if not directory.is_dir():
        return []
    ckpts = RunCheckpoints(directory, keep=1_000_000, async_save=False)
    try:
        return sorted(ckpts.all_steps())
    finally:
        ckpts.close()


def _restore_params(cfg: Config, run: Path, step: int | None) -> tuple[dict[str, Any], int]:
    import orbax.checkpoint as ocp

    from grc_jax.train.state import init_train_params

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
    shapes = jax.eval_shape(lambda: init_train_params(cfg, jax.random.key(0)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {
        "params": jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes
        )
    }
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


def load_model(
    path: str | Path, step: int | None = None
) -> tuple[Config, dict[str, Any], Tokenizer]:
    """(config, params `{"model", "head"[, "lora"]}`, tokenizer) of a run or import directory.

    Args:
      path: `runs/<name>` written by `grc train`, or a `grc import-hf` output directory.
      step: checkpoint step of a run (default: the newest); not allowed for an import directory.
    """
    path = Path(path)
    kind = _kind(path)
    cfg = load_config(path / "config.yaml")
    if kind == "run":
        params, _ = _restore_params(cfg, path, step)
    else:
        if step is not None:
            raise ModelLoadError(
                f"{str(path)!r} is an import directory: it has no steps (got step={step})"
            )
        from grc_jax.convert.hf_import import load_imported
        from grc_jax.train.state import init_train_params

        cfg, model_params = load_imported(path)
        # The embedding head a GRC run from this import starts with (same seed as training).
        full = init_train_params(cfg, jax.random.key(cfg.train.seed), model_params)
        params = {"model": full["model"], "head": full["head"]}
    return cfg, params, _tokenizer(cfg, path)
