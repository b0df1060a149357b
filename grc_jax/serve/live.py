"""A `grc serve` server inside this process (uvicorn in a thread): for tests and benchmarks that
drive a real HTTP server with real clients, and stop it when they are done."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import httpx2
import openai
import uvicorn

from grc_jax.serve.launch import ServeOptions, build_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`grc serve MODEL` with `options` (`ServeOptions` fields) on 127.0.0.1 at a free port.

    `client` is an `openai.OpenAI` client of it, `http` an httpx client for what the OpenAI
    client does not send; `on_engine(fn, ...)` runs `fn` on the engine's thread.
    """

    def __init__(self, model: str, start_timeout: float = 60.0, **options: Any):
        self.port = free_port()
        self.app, self.worker, self.name = build_server(ServeOptions(model, **options))
        self.engine = self.worker.engine
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.close()
                raise RuntimeError(f"the server on port {self.port} did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(
            base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=600
        )
        self.http = httpx2.Client(base_url=self.url, timeout=600)

    def on_engine(self, fn, *args: Any, **kwargs: Any) -> Any:
        return self.worker.call(fn, *args, **kwargs).result(timeout=600)

    def quiet(self, timeout: float = 60.0) -> None:
        """Wait until no request runs or waits (cancellations land at the next step)."""
        deadline = time.monotonic() + timeout
        while not self.worker.scheduler.idle:
            if time.monotonic() > deadline:
                raise TimeoutError("requests still running")
            time.sleep(0.02)

    def close(self) -> None:
        if hasattr(self, "http"):
            self.http.close()
        self.server.should_exit = True
        self.thread.join(30)
        self.worker.stop()

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
