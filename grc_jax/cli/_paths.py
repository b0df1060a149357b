"""Operating-system errors on paths the user named, as one-line user errors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from grc_jax.core.errors import MissingPathError, UserError


class PathAccessError(UserError, OSError):
    """A path the user named cannot be used (permission denied, a directory where a file
    belongs, ...); the message is the operating system's."""


@contextlib.contextmanager
def user_paths(*kinds: type[OSError]) -> Iterator[None]:
    """Inside, an `OSError` of `kinds` is the user's path's fault: it is raised again as a
    `MissingPathError` (file not found) or `PathAccessError`, with the same message."""
    try:
        yield
    except UserError:
        raise
    except kinds as e:
        cls = MissingPathError if isinstance(e, FileNotFoundError) else PathAccessError
        raise cls(str(e)) from e
