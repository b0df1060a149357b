"""The `grc` command line: one subcommand per job (`grc --help` lists them)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NamedTuple

from grc_jax.core.errors import UserError


class Command(NamedTuple):
    """Where a subcommand lives: `module` defines `add_<name>_arguments(parser)` and
    `run_<name>(args) -> int` (name with `-` as `_`); it is imported only when the command runs
    or its `--help` is asked, so that `grc --help` imports nothing heavy."""

    module: str
    help: str


COMMANDS: dict[str, Command] = {
    "adapter": Command(
        "grc_jax.cli.convert", "save a frozen-base run's adapter (latents, head, LoRA)"
    ),
    "aot": Command(
        "grc_jax.cli.aot", "compile the train step for a TPU slice, without one: memory"
    ),
    "compress": Command("grc_jax.cli.infer", "compress texts into latent memory files"),
    "data": Command(
        "grc_jax.cli.data", "make or convert training data (synth, real text, BEIR, prepare)"
    ),
    "embed": Command("grc_jax.cli.infer", "embed texts and queries (JSON; --out writes .npy)"),
    "eval": Command(
        "grc_jax.cli.evaluate", "retrieval, compression and RAG figures on a BEIR or JSONL set"
    ),
    "export": Command(
        "grc_jax.cli.convert", "export a run or import as a Hugging Face (PyTorch) directory"
    ),
    "generate": Command("grc_jax.cli.infer", "generate text, optionally reading latent memories"),
    "import-hf": Command(
        "grc_jax.cli.convert", "import a Hugging Face directory or GGUF file as grc params"
    ),
    "index": Command(
        "grc_jax.cli.infer", "build a retrieval index (embeddings + memories) of a corpus"
    ),
    "rag": Command(
        "grc_jax.cli.infer", "retrieve top-k documents, then generate over their memories"
    ),
    "serve": Command("grc_jax.cli.serve", "an OpenAI-compatible HTTP server (continuous batching)"),
    "tokenizer": Command("grc_jax.cli.data", "train a sentencepiece tokenizer"),
    "train": Command("grc_jax.cli.train", "train (or resume) a GRC model from a YAML config"),
    "update": Command("grc_jax.cli.infer", "recurrent mode: fold a chunk of text into a memory"),
}


def _stem(name: str) -> str:
    return name.replace("-", "_")


def command_module(name: str) -> ModuleType:
    """The module of subcommand `name` (imported now)."""
    return importlib.import_module(COMMANDS[name].module)


def add_arguments_fn(name: str):
    """`add_<name>_arguments` of subcommand `name`."""
    return getattr(command_module(name), f"add_{_stem(name)}_arguments")


def run_fn(name: str):
    """`run_<name>` of subcommand `name`."""
    return getattr(command_module(name), f"run_{_stem(name)}")


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand named in `argv`: its first word that is not a global option."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `grc` parser; only `command`'s own arguments are added (importing its module)."""
    parser = argparse.ArgumentParser(prog="grc", description=__doc__)
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error instead of its one-line message",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if name == command:
            add_arguments_fn(name)(p)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """`parser.parse_args(argv)`, except that a command's `section.key=value` overrides may also
    follow its options (`grc train --config X --stop-after 5 train.steps=10`): argparse fills a
    `nargs="*"` positional once, so later positional words come back unparsed; they are appended
    to `overrides` in order. An unknown option is still argparse's error (exit 2)."""
    args, extra = parser.parse_known_args(argv)
    overrides = getattr(args, "overrides", None)
    if extra and isinstance(overrides, list) and not any(a.startswith("-") for a in extra):
        args.overrides = [*overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run `grc ARGV`; returns the exit code.

    A `UserError` (a mistake the user can fix) becomes one line, `grc <command>: error: <message>`
    on stderr, and the error's `exit_code`; with `--debug` it is raised with its traceback. Any
    other exception is a bug and propagates.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(build_parser(_chosen(argv)), argv)
    try:
        return run_fn(args.command)(args)
    except UserError as e:
        if args.debug:
            raise
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"grc {args.command}: error: {message}", file=sys.stderr)
        return e.exit_code
