"""`GET /metrics`: Prometheus text format from `prometheus_client`, one registry per server.

Gauges read the scheduler and pools when scraped (queue length, running requests, pages in use,
memories held); counters and histograms are updated as requests run (generated tokens, requests
by endpoint and status, time to first token, time between tokens);
`grc_generation_tokens_per_second` is the output rate over the last 10 seconds.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self, worker: Any, window_s: float = 10.0):
        self.registry = CollectorRegistry()
        sched, engine = worker.scheduler, worker.engine
        r = self.registry

        def gauge(name: str, doc: str, fn) -> None:
            Gauge(name, doc, registry=r).set_function(fn)

        gauge("grc_queue_length", "requests waiting for a decode slot", lambda: len(sched.waiting))
        gauge("grc_running_requests", "requests in decode slots", lambda: sched.running)
        gauge(
            "grc_pages_in_use",
            "KV-cache pages held by requests",
            lambda: engine.pool.n_pages - 1 - engine.pool.free_pages,
        )
        gauge(
            "grc_pages_total", "KV-cache pages requests can hold", lambda: engine.pool.n_pages - 1
        )
        gauge("grc_memories_held", "latent memories on the device", lambda: engine.memories.held)
        gauge(
            "grc_memory_slots", "latent memory slots on the device", lambda: engine.memories.n_slots
        )
        gauge(
            "grc_memories_read",
            "latent memories read by running requests",
            lambda: engine.memories.read,
        )
        gauge(
            "grc_generation_tokens_per_second",
            "generated tokens per second (last 10 s)",
            self._rate,
        )
        self.tokens = Counter("grc_generation_tokens", "generated tokens", registry=r)
        self.requests = Counter(
            "grc_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "grc_time_to_first_token_seconds",
            "submission to first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "grc_inter_token_latency_seconds",
            "time between a request's generated tokens",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.evictions = Gauge("grc_memory_evictions", "memories evicted (pool full)", registry=r)
        self.evictions.set_function(lambda: engine.memories.evictions)
        self._window = window_s
        self._recent: collections.deque[float] = collections.deque()

    def token(self) -> None:
        """Count one generated token (called on the engine's thread)."""
        self.tokens.inc()
        self._recent.append(time.monotonic())

    def _rate(self) -> float:
        cutoff = time.monotonic() - self._window
        while self._recent and self._recent[0] < cutoff:
            self._recent.popleft()
        return len(self._recent) / self._window
