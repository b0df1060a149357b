"""The run lock: one `grc train` at a time per run directory.

`<run>/.lock` is locked with `fcntl.flock` before anything is written to the run directory and
held until `train` returns; it holds the holder's host, pid and start time as text. A second
process gets `RunInUseError` (one line, exit 2) naming the holder. The kernel releases a flock
when its process dies, however it dies, so the lock of a crashed or killed run is simply free:
the next run takes it over and reports the previous holder it found in the file. A clean exit
empties the file, so only a run that died while holding the lock leaves a holder behind.

Multi-process runs: only process 0 locks (the others write nothing to the run directory but their
share of the Orbax saves); `train` makes every process stop when process 0 cannot lock.

On a filesystem without flock support the run goes on unlocked, with a warning.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from grc_jax.core.errors import RunInUseError

LOCK_NAME = ".lock"


def _describe(text: str) -> str:
    """`host H, pid P, since T` from the lock file's `key=value` text (the raw text otherwise)."""
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    if {"host", "pid", "since"} <= fields.keys():
        return f"host {fields['host']}, pid {fields['pid']}, since {fields['since']}"
    return text.strip() or "holder unknown"


class RunLock:
    """An exclusive flock on `<directory>/.lock`; `acquire`, then `release` (or a `with`)."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunInUseError(
                    f"run directory {self.path.parent} is in use by another `grc train` "
                    f"({_describe(holder)}; lock file {self.path}); wait for it to finish or stop "
                    "it, or choose another train.run_name"
                ) from None
            print(
                f"warning: cannot lock {self.path} ({e.strerror}: the filesystem does not support "
                "flock); training without a run lock",
                file=sys.stderr,
                flush=True,
            )
            return
        previous = os.pread(fd, 4096, 0).decode(errors="replace")
        if previous.strip():
            print(
                f"warning: run lock {self.path} named a previous holder ({_describe(previous)}) "
                "that is gone (it crashed or was killed); taking the lock over",
                file=sys.stderr,
                flush=True,
            )
        since = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        text = f"host={socket.gethostname()} pid={os.getpid()} since={since}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # a clean exit leaves no holder behind
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def lock_run(directory: str | Path) -> Iterator[None]:
    """Hold the run lock of `directory` (process 0) for the `with` block. With several processes
    process 0 tells the others whether it got the lock, so that all of them stop when it did not."""
    lock = RunLock(directory) if jax.process_index() == 0 else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except RunInUseError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental.multihost_utils import broadcast_one_to_all

        if not int(broadcast_one_to_all(np.int32(error is None))) and error is None:
            raise RunInUseError(
                f"run directory {directory} is in use by another `grc train` (process 0 could "
                "not lock it; see its error)"
            )
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
