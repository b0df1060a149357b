"""`grc import-hf SRC OUT`: import a HF directory or a GGUF file (see docs/hf_import.md)."""

from __future__ import annotations

import argparse
import sys

from grc_jax.cli import add_command


def _args(p: argparse.ArgumentParser) -> None:
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


def _run(args: argparse.Namespace) -> int:
    from grc_jax.convert.hf_import import import_checkpoint

    grc = {} if args.num_latents is None else {"num_latents": args.num_latents}
    model = {"scan_layers": True} if args.scan_layers else {}
    try:
        cfg = import_checkpoint(
            args.src, args.out, grc, seed=args.seed, model_overrides=model, force=args.force
        )
    except (FileExistsError, PermissionError, IsADirectoryError) as e:
        print(f"grc import-hf: error: {e}", file=sys.stderr)
        return 2
    import json
    from pathlib import Path

    info = json.loads((Path(args.out) / "import_info.json").read_text())
    m = cfg.model
    print(
        f"imported {m.family}: {m.n_layers} layers, d_model {m.d_model}, "
        f"{m.n_heads}/{m.n_kv_heads} heads, vocab {m.vocab_size}, "
        f"{info['num_params'] / 1e6:.1f}M params ({info['format']}) -> {args.out}"
    )
    return 0


add_command("import-hf", "import a Hugging Face directory or GGUF file as grc params", _args, _run)
