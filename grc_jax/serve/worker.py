"""The engine's thread: one thread owns the `Engine` and its `Scheduler`; everything else talks to
it through `call` (a function run on that thread between steps, its result a future).

Between two scheduler steps the thread runs every function handed to it (submitting, cancelling,
compressing a memory, embedding): JAX work and all engine state stay on one thread, with no
locks, and a long compression delays decoding by one call, never corrupts it. A step that raises
(a bug, not bad input: input is checked at submission) fails the requests it ran, frees their
pages, logs the traceback and keeps serving.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from grc_jax.infer.scheduler import Scheduler

log = logging.getLogger("grc.serve")

_STOP = object()


class EngineWorker:
    def __init__(self, engine: Any, policy: str = "continuous", max_queue: int = 256):
        self.engine = engine
        self.scheduler = Scheduler(engine, policy=policy, max_queue=max_queue)
        self._inbox: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="grc-engine", daemon=True)
        self.step_errors = 0
        self.started_at = time.time()

    def start(self) -> EngineWorker:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the function in progress and stop (requests still running are cancelled)."""
        if self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run `fn(*args, **kwargs)` on the engine's thread; its result (or error) as a future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not self._thread.is_alive():
            fut.set_exception(RuntimeError("the engine thread is not running"))
            return fut
        self._inbox.put((fn, args, kwargs, fut))
        return fut

    def _loop(self) -> None:
        while True:
            items = []
            try:
                # Wait for work only when the scheduler has none; otherwise just drain.
                items.append(self._inbox.get(timeout=0.5) if self.scheduler.idle else
                             self._inbox.get_nowait())  # fmt: skip
                while True:
                    items.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            for item in items:
                if item is _STOP:
                    self._cancel_all()
                    return
                fn, args, kwargs, fut = item
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(*args, **kwargs))
                    except BaseException as e:  # handed to the caller, who answers 4xx/5xx
                        fut.set_exception(e)
            if not self.scheduler.idle:
                try:
                    self.scheduler.step()
                except Exception:
                    self.step_errors += 1
                    log.exception("engine step failed; the requests it ran are ended")
                    self.scheduler.abort_running("error")

    def _cancel_all(self) -> None:
        for j in list(self.scheduler.waiting) + [j for j in self.scheduler.slots if j]:
            self.scheduler.cancel(j)
        self.scheduler.finish_cancelled()
