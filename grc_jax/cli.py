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


def _load_subcommands() -> None:
    # Imported for their `_COMMANDS` registrations; kept lazy so `grc --help` stays fast.
    from grc_jax.convert import cli as _convert_cli  # noqa: F401
    from grc_jax.convert import export_cli as _export_cli  # noqa: F401
    from grc_jax.data import cli as _data_cli  # noqa: F401
    from grc_jax.infer import cli as _infer_cli  # noqa: F401
    from grc_jax.train import aot as _aot  # noqa: F401
    from grc_jax.train import cli as _train_cli  # noqa: F401


def main(argv: Sequence[str] | None = None) -> int:
    _load_subcommands()
    parser = argparse.ArgumentParser(prog="grc", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, _run) in sorted(_COMMANDS.items()):
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    from grc_jax.core.config import ConfigError

    try:
        return _COMMANDS[args.command][2](args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"grc {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m grc_jax.cli`: run the imported module's `main`, whose registry the subcommand
    # modules fill (this file as `__main__` is a second copy with an empty one).
    from grc_jax import cli as _cli

    sys.exit(_cli.main())
