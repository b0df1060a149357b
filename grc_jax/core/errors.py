"""Error types. A `UserError` is a mistake the user can fix (bad config, data, path, checkpoint,
memory, index, import or export); the CLI prints it as one line and exits with its `exit_code`.
Any other exception is a bug and keeps its traceback.

Each class also derives from the builtin it has always been (`ValueError`, `FileNotFoundError`,
`RuntimeError`), so code that catches those keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error a user causes and can fix; the CLI exits with `exit_code`."""

    exit_code = 2


class UsageError(UserError, ValueError):
    """A bad argument or combination of arguments (CLI flags, API arguments)."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist."""


class OutputExistsError(UserError, FileExistsError):
    """An output path exists and may not be overwritten."""


class ConfigError(UserError, ValueError):
    """A config file, key or value is invalid."""


class DataError(UserError, ValueError):
    """Training or evaluation data is malformed (a bad JSONL line, an example that cannot be laid
    out, a record that does not fit)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing or cannot be restored (damaged files, non-finite params)."""


class RunInUseError(UserError, RuntimeError):
    """Another process holds the run directory's lock (`<run>/.lock`)."""


class OtherProcessError(UserError, RuntimeError):
    """Another process of a multi-process run stopped with a `UserError` (named in the message);
    this one stops with it rather than wait for it in a collective."""


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is left as it was. Exit code 1:
    the run diverged (a failed run, like a crash), not a refused input."""

    exit_code = 1


class ModelLoadError(UserError, ValueError):
    """A model path is missing, is not a run/import directory, or has no usable checkpoint."""


class MemoryMismatchError(UserError, ValueError):
    """A latent memory was made by a different model or configuration than the reader."""


class OutOfPagesError(UserError, RuntimeError):
    """The page pool cannot hold another request; lower the batch or raise `n_pages`."""


class IndexFormatError(UserError, ValueError):
    """An index directory is malformed or incomplete, or its documents are unusable."""


class IndexMismatchError(MemoryMismatchError):
    """An index was built by another model (or K / memory mode) than the one reading it."""


class ImportModelError(UserError, ValueError):
    """A checkpoint to import (HF directory, GGUF file) cannot be read or mapped."""


class ExportError(UserError, ValueError):
    """A model cannot be exported to the requested format."""
