"""`grc export --ckpt RUN|CHECKPOINT|IMPORT --out DIR`: a HF directory (docs/export.md)."""

from __future__ import annotations

import argparse
import re
import sys

from grc_jax.cli import add_command

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


def _args(p: argparse.ArgumentParser) -> None:
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


def _run(args: argparse.Namespace) -> int:
    from grc_jax.convert.export import export_checkpoint

    try:
        result = export_checkpoint(
            args.ckpt, args.out, args.dtype, step=args.step, force=args.force,
            max_shard_bytes=args.max_shard_size,
        )  # fmt: skip
    except (FileExistsError, PermissionError, IsADirectoryError) as e:
        print(f"grc export: error: {e}", file=sys.stderr)
        return 2
    step = "" if result.step is None else f", step {result.step}"
    print(
        f"exported {result.family} ({result.dtype}{step}, {result.num_params / 1e6:.1f}M params, "
        f"{len(result.files)} files) -> {result.out}"
    )
    return 0


add_command("export", "export a run or import as a Hugging Face (PyTorch) directory", _args, _run)
