"""SIGTERM in a single-process run: save a checkpoint at the next step, then stop.

With jax.distributed, Orbax's preemption sync point (`CheckpointManager.reached_preemption`) turns
a SIGTERM to any process into a step that every process saves at and stops after. A single
process has no such notifier, so `SigtermNotice` installs a SIGTERM handler for the length of
`train` that only records the signal; the loop then treats the next step as that preemption step
(same checkpoint, same `preemption notice: saved checkpoint N, stopping` line) and the previous
handler is put back at the end.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax


class SigtermNotice:
    """`received` turns True on SIGTERM while the `with` block runs (single process, main
    thread only; elsewhere nothing is installed and it stays False)."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True

    def __enter__(self) -> SigtermNotice:
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGTERM, previous)
            self._installed = False
