"""`grc import-hf SRC OUT` (a HF directory or GGUF file -> grc params, docs/hf_import.md) and
`grc export --ckpt RUN|CHECKPOINT|IMPORT --out DIR` (-> a HF directory, docs/export.md)."""

from __future__ import annotations

import argparse
import re

# The conversion modules (JAX, numpy, safetensors, gguf) are imported inside the `run_*`
# functions (deferred to keep `--help` fast).

# Errors the operating system reports on SRC / OUT: one line, like the others.
_PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError)

# ---------------------------------------------------------------------------------- import-hf


def add_import_hf_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src",
        metavar="SRC",
        help="HF model directory (config.json + *.safetensors) or a .gguf file",
    )
    p.add_argument("out", metavar="OUT", help="output directory (must be empty unless --force)")
    p.add_argument(
        "--force", action="store_true", help="write into a non-empty OUT, replacing an import"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the latent table init (default 0)")
    p.add_argument("--scan-layers", action="store_true", help="store params in the scanned layout")
    p.add_argument("--num-latents", type=int, default=None, metavar="K", help="latent table size")


def run_import_hf(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from grc_jax.cli._paths import user_paths
    from grc_jax.convert.hf_import import import_checkpoint

    grc = {} if args.num_latents is None else {"num_latents": args.num_latents}
    model = {"scan_layers": True} if args.scan_layers else {}
    with user_paths(*_PATH_ERRORS):
        cfg = import_checkpoint(
            args.src, args.out, grc, seed=args.seed, model_overrides=model, force=args.force
        )
    info = json.loads((Path(args.out) / "import_info.json").read_text())
    m = cfg.model
    print(
        f"imported {m.family}: {m.n_layers} layers, d_model {m.d_model}, "
        f"{m.n_heads}/{m.n_kv_heads} heads, vocab {m.vocab_size}, "
        f"{info['num_params'] / 1e6:.1f}M params ({info['format']}) -> {args.out}"
    )
    return 0


# ---------------------------------------------------------------------------------- export

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}  # fmt: skip


def parse_size(text: str) -> int:
    """`2GB`, `500MB`, `1GiB`, `123456` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB or 500MB, got {text!r}")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return size


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ckpt", required=True, metavar="PATH",
        help="a `grc train` run directory (newest checkpoint unless --step), one of its "
        "checkpoints/<step> directories, or a `grc import-hf` directory",
    )  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (empty or new)")
    p.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16"], help="weight dtype (default fp32)"
    )
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run")
    p.add_argument(
        "--force", action="store_true",
        help="write into a non-empty --out, replacing a previous export there (other files stay)",
    )  # fmt: skip
    p.add_argument(
        "--max-shard-size", type=parse_size, default="2GB", metavar="SIZE",
        help="split model.safetensors into shards of at most SIZE (default 2GB)",
    )  # fmt: skip


def run_export(args: argparse.Namespace) -> int:
    from grc_jax.cli._paths import user_paths
    from grc_jax.convert.export import export_checkpoint

    with user_paths(*_PATH_ERRORS):
        result = export_checkpoint(
            args.ckpt, args.out, args.dtype, step=args.step, force=args.force,
            max_shard_bytes=args.max_shard_size,
        )  # fmt: skip
    step = "" if result.step is None else f", step {result.step}"
    print(
        f"exported {result.family} ({result.dtype}{step}, {result.num_params / 1e6:.1f}M params, "
        f"{len(result.files)} files) -> {result.out}"
    )
    return 0


# ---------------------------------------------------------------------------------- adapter


def add_adapter_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a `grc train` run with train.freeze_base=true")
    p.add_argument("--out", required=True, help="adapter directory to write (empty unless --force)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--force", action="store_true", help="overwrite the adapter files in --out")


def run_adapter(args: argparse.Namespace) -> int:
    from grc_jax.cli._paths import user_paths
    from grc_jax.convert.adapter import export_adapter

    with user_paths(*_PATH_ERRORS):
        info = export_adapter(args.run, args.out, args.step, force=args.force)
    where = info["base"].get("package") or {"name": info["base"]["source"]}
    print(
        f"adapter of {args.run} step {info['source']['step']}: {info['num_params'] / 1e6:.2f}M "
        f"params, {info['bytes'] / 1e6:.1f} MB; base {where['name']} -> {args.out}"
    )
    return 0
