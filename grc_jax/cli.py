"""The `grc` command line: one subcommand per job (`grc --help` lists them)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

# Each subcommand module registers itself with `add_command`: name -> (help, add_arguments, run).
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
_COMMANDS: dict[str, Command] = {}


def add_command(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> None:
    """Register a subcommand: its argument set-up and its runner (which returns an exit code)."""
    _COMMANDS[name] = (help, add_arguments, run)


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="a.b=value config overrides")


def _train(args: argparse.Namespace) -> int:
    from grc_jax.config import load_config

    load_config(args.config, args.overrides)  # fail early on a bad config even before training exists
    print(
        "grc train: not implemented yet - GRC training lands with issue #3 "
        f"(config {args.config} loaded and validated).",
        file=sys.stderr,
    )
    return 3


add_command("train", "train a GRC model from a YAML config", _train_args, _train)


def _load_subcommands() -> None:
    # Imported for their `_COMMANDS` registrations; kept lazy so `grc --help` stays fast.
    from grc_jax.convert import cli as _convert_cli  # noqa: F401


def main(argv: Sequence[str] | None = None) -> int:
    _load_subcommands()
    parser = argparse.ArgumentParser(prog="grc", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, _run) in sorted(_COMMANDS.items()):
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    from grc_jax.config import ConfigError

    try:
        return _COMMANDS[args.command][2](args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"grc {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
