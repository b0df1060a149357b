"""Continuous batching over the engine's paged cache: requests join and leave the fixed decode
batch between steps.

The engine's batch has `max_batch` slots. Each `step()`:

1. finishes cancelled jobs (their pages and memory reads are released at once);
2. admits waiting jobs, first come first served, into free slots while the page pool can hold
   each one's prompt + `max_new_tokens` (`policy="static"` admits only into an empty batch: a
   whole batch runs to its end before the next starts, the behaviour of `Engine.generate`'s
   turns of `max_batch`);
3. runs one fixed-shape program: a prefill chunk (`prefill_chunk` prompt tokens for each of the
   jobs still reading their prompts, in a batch of `prefill_rows` rows: the fewest that hold
   them, or fewer rows and the rest next time when that would leave over a quarter empty) or a
   decode step (one token for every slot that is generating), alternating when both kinds wait,
   so a long prompt never stalls the slots that generate;
4. samples the next token of every slot whose prompt (or last token) was just read, each job with
   its own seeded stream (`fold_in(key(seed), n)` for its n-th token: a job's tokens do not depend
   on what else runs), and finishes jobs on a stop token or at `max_new_tokens`.

The programs are fixed whatever the requests (`programs(engine)`: a decode step of `max_batch`
rows, and a prefill chunk of each row count in `prefill_rows(max_batch)`, the powers of two up to
`max_batch`; `warm_up` compiles them all), and a row's arithmetic does not depend on the other
rows: a request gives the same tokens alone or in any company (its logits to fp32 rounding: its
prompt may be read by a prefill program of another row count). Prefill is sized to the jobs that
prefill because its cost grows with its rows: a request that arrives alone is read in a
`[1, chunk]` program, not in a full-batch one. All of it runs on one thread (the engine's);
callers on other threads hand work to that thread (see `grc_jax.serve.worker`).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from grc_jax.core.constants import check_memory_reads
from grc_jax.core.errors import UsageError, UserError
from grc_jax.core.roles import TEXT
from grc_jax.infer.cache import block_table
from grc_jax.infer.sampling import SamplingParams

POLICIES = ("continuous", "static")


class QueueFullError(UserError, RuntimeError):
    """More requests wait than the scheduler's bound allows (the server answers 503)."""


def prefill_rows(max_batch: int) -> tuple[int, ...]:
    """Row counts of the prefill programs: the powers of two below `max_batch`, and `max_batch`."""
    rows = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return (*rows, max_batch)


def _rows_for(n: int, sizes: tuple[int, ...]) -> int:
    """Rows of the prefill program for `n` jobs: the smallest size that holds them all unless it
    would be over a quarter empty, then the largest that they fill (the rest wait a turn)."""
    above = min((r for r in sizes if r >= n), default=sizes[-1])
    below = max(r for r in sizes if r <= n)
    return above if 4 * min(n, above) >= 3 * above else below


def programs(engine: Any) -> list[tuple[int, int]]:
    """(rows, tokens per row) of every program the scheduler runs on `engine`."""
    o = engine.opts
    return [(r, o.prefill_chunk) for r in prefill_rows(o.max_batch)] + [(o.max_batch, 1)]


def warm_up(engine: Any) -> None:
    """Compile every generation and sampling program (`programs`) by running each on empty rows
    (they write nothing: no text index is valid), so no request waits for a compilation."""
    for rows, c in programs(engine):
        z = np.zeros(rows, np.int32)
        logits = engine.generation_step(
            np.zeros((rows, c), np.int32), np.zeros((rows, c), np.int32),
            np.full((rows, c), -1, np.int32), z, z,
            block_tables=np.zeros((rows, engine.table_width), np.int32),
            mem_tables=np.zeros((rows, engine.opts.max_memories), np.int32), mem_counts=z,
            starts=z,
        )  # fmt: skip
        engine.sample_rows(logits, z, z, np.zeros(rows, np.float32), z, np.ones(rows, np.float32))


@dataclasses.dataclass(eq=False)
class Job:
    """One generation request and, once it ran, its result.

    `memory_keys` name memories stored in the engine's memory pool (read in this order, before the
    prompt); `on_token(job, token)` is called for each generated token (a kept stop token too),
    `on_finish(job)` once at the end, both on the engine's thread.
    """

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_tokens: tuple[int, ...] = ()
    memory_keys: tuple[str, ...] = ()
    keep_stop: bool = False
    return_logits: bool = False
    on_token: Callable[[Job, int], None] | None = None
    on_finish: Callable[[Job], None] | None = None
    # Results: generated tokens, why it ended ("stop", "length", "cancelled", "error"), timings
    # (time.perf_counter() seconds), the logits that chose each token when `return_logits`.
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    step_logits: list[np.ndarray] = dataclasses.field(default_factory=list)
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    # The scheduler's bookkeeping.
    cancelled: bool = False
    slot: int | None = None
    pages: list[int] = dataclasses.field(default_factory=list)
    mem_slots: list[int] = dataclasses.field(default_factory=list)
    written: int = 0  # tokens of this job in the cache
    pending: int | None = None  # the last sampled token, read by the next decode step

    start: int = 0  # RoPE position of the first prompt token: after the memories' latents

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    """Admits, steps and finishes `Job`s on `engine` (an `Engine`); see the module docstring."""

    def __init__(self, engine: Any, policy: str = "continuous", max_queue: int = 1024):
        if policy not in POLICIES:
            raise UsageError(f"scheduler policy: expected one of {POLICIES}, got {policy!r}")
        if not isinstance(max_queue, int) or max_queue < 1:
            raise UsageError(f"max_queue: expected a positive integer, got {max_queue!r}")
        self.engine, self.policy, self.max_queue = engine, policy, max_queue
        self.waiting: collections.deque[Job] = collections.deque()
        self.slots: list[Job | None] = [None] * engine.opts.max_batch
        self._prefill_turn = True
        self.generated_tokens = 0  # total, for throughput metrics
        self.steps = {"prefill": 0, "decode": 0}
        self.peak_running = 0  # most slots busy at once (since the last reset)

    # ------------------------------------------------------------------ state

    @property
    def running(self) -> int:
        return sum(j is not None for j in self.slots)

    @property
    def idle(self) -> bool:
        return not self.waiting and self.running == 0

    # ------------------------------------------------------------------ submitting

    def submit(self, job: Job, what: str = "the request") -> Job:
        """Queue `job` (validated now, `what` naming it in errors: a job that can never run is
        refused with a `UsageError`, or a `MemoryMismatchError` for more memories than the
        model's memory mode reads; a full queue raises `QueueFullError`). Its memories are
        read-locked from now on."""
        e, opts = self.engine, self.engine.opts
        if not job.prompt:
            raise UsageError(f"{what}: the prompt is empty")
        if not isinstance(job.max_new_tokens, int) or job.max_new_tokens < 0:
            raise UsageError(
                f"max_new_tokens: expected an integer >= 0, got {job.max_new_tokens!r}"
            )
        m, n, new = len(job.memory_keys), len(job.prompt), job.max_new_tokens
        reads = f"{m} memories x {e.K} latents + " if m else ""
        e._check_span(m * e.K + n + new, what, f"{reads}{n} tokens + {new} new tokens")
        check_memory_reads(e.cfg.grc.memory_mode, m, what)
        total = n + new
        if total > opts.max_seq_len:
            raise UsageError(
                f"{what}: {n} prompt + {new} new tokens exceed max_seq_len={opts.max_seq_len}"
            )
        if e.pool.pages_for(total) > e.pool.n_pages - 1:
            raise UsageError(
                f"{total} tokens need {e.pool.pages_for(total)} pages, the pool has "
                f"{e.pool.n_pages - 1}"
            )
        if len(job.memory_keys) > opts.max_memories:
            raise UsageError(
                f"{len(job.memory_keys)} memories, the engine reads at most {opts.max_memories}"
            )
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"{len(self.waiting)} requests already wait (the bound)")
        job.mem_slots = e.memories.acquire(list(job.memory_keys))
        job.start = len(job.memory_keys) * e.K
        job.submitted_at = time.perf_counter()
        if job.max_new_tokens == 0:  # nothing to generate: done without running
            self._finish(job, "length")
        else:
            self.waiting.append(job)
        return job

    def cancel(self, job: Job) -> None:
        """Stop `job` at the next step (its pages and memory reads are freed then)."""
        job.cancelled = True

    # ------------------------------------------------------------------ stepping

    def run(self, jobs: list[Job]) -> list[Job]:
        """Submit `jobs` and step until they are all done."""
        for j in jobs:
            self.submit(j)
        while not all(j.done for j in jobs):
            self.step()
        return jobs

    def step(self) -> bool:
        """One admission round and one program run; False when there was nothing to do."""
        self.finish_cancelled()
        self._admit()
        active = [j for j in self.slots if j is not None]
        if not active:
            return False
        prefill = [j for j in active if j.written < len(j.prompt)]
        decode = [j for j in active if j.written >= len(j.prompt)]
        if prefill and (not decode or self._prefill_turn):
            self._prefill(prefill)
            self._prefill_turn = False
        else:
            self._decode(decode)
            self._prefill_turn = True
        return True

    def finish_cancelled(self) -> None:
        for j in [j for j in self.waiting if j.cancelled]:
            self._finish(j, "cancelled")
            self.waiting.remove(j)  # after its memory reads are released (see `_finish`)
        for j in self.slots:
            if j is not None and j.cancelled:
                self._finish(j, "cancelled")

    def abort_running(self, reason: str) -> None:
        """End every job in a slot with `reason` (after a failed step: the cache may hold a
        partial write, so none of them can go on); waiting jobs stay queued."""
        for j in self.slots:
            if j is not None:
                self._finish(j, reason)

    def _admit(self) -> None:
        if self.policy == "static" and self.running:
            return
        pool = self.engine.pool
        while self.waiting and None in self.slots:
            j = self.waiting[0]
            if pool.pages_for(len(j.prompt) + j.max_new_tokens) > pool.free_pages:
                return  # first come first served: the head waits for pages
            self.waiting.popleft()
            j.slot = self.slots.index(None)
            j.pages = pool.alloc(j.slot, len(j.prompt) + j.max_new_tokens)
            self.slots[j.slot] = j
            self.peak_running = max(self.peak_running, self.running)

    def _inputs(self, rows: list[Job | None]) -> dict[str, np.ndarray]:
        """Tables of a program whose row r runs `rows[r]` (None: an empty row, zeros)."""
        opts, B = self.engine.opts, len(rows)
        tables = np.zeros((B, self.engine.table_width), np.int32)
        mem_tables = np.zeros((B, opts.max_memories), np.int32)
        mem_counts = np.zeros(B, np.int32)
        starts = np.zeros(B, np.int32)
        for r, j in enumerate(rows):
            if j is not None:
                tables[r] = block_table(j.pages, self.engine.table_width)
                mem_tables[r, : len(j.mem_slots)] = j.mem_slots
                mem_counts[r] = len(j.mem_slots)
                starts[r] = j.start
        return dict(block_tables=tables, mem_tables=mem_tables, mem_counts=mem_counts,
                    starts=starts)  # fmt: skip

    def _prefill(self, jobs: list[Job]) -> None:
        c = self.engine.opts.prefill_chunk
        rows = _rows_for(len(jobs), prefill_rows(self.engine.opts.max_batch))
        jobs = sorted(jobs, key=lambda j: j.submitted_at)[:rows]  # first come first read
        tok, idx = np.zeros((rows, c), np.int32), np.full((rows, c), -1, np.int32)
        lengths, last = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        for r, j in enumerate(jobs):
            seg = j.prompt[j.written : j.written + c]
            n = len(seg)
            tok[r, :n] = seg
            idx[r, :n] = np.arange(j.written, j.written + n)
            lengths[r], last[r] = j.written + n, n - 1
        tables = self._inputs([*jobs, *[None] * (rows - len(jobs))])
        logits = self.engine.generation_step(tok, np.where(idx >= 0, TEXT, 0), idx, lengths, last,
                                             **tables)  # fmt: skip
        self.steps["prefill"] += 1
        for r, j in enumerate(jobs):
            j.written = int(lengths[r])
        self._sample([(j, r) for r, j in enumerate(jobs) if j.written == len(j.prompt)], logits)

    def _decode(self, jobs: list[Job]) -> None:
        B = self.engine.opts.max_batch
        tok, idx = np.zeros((B, 1), np.int32), np.full((B, 1), -1, np.int32)
        lengths = np.zeros(B, np.int32)
        for j in jobs:
            tok[j.slot, 0], idx[j.slot, 0] = j.pending, j.written
            lengths[j.slot] = j.written + 1
        tables = self._inputs(self.slots)
        logits = self.engine.generation_step(tok, np.where(idx >= 0, TEXT, 0), idx, lengths,
                                             np.zeros(B, np.int32), **tables)  # fmt: skip
        self.steps["decode"] += 1
        for j in jobs:
            j.written += 1
        self._sample([(j, j.slot) for j in jobs], logits)

    def _sample(self, rows: list[tuple[Job, int]], logits: Any) -> None:
        """The next token of each (job, row) of `rows` from that row of `logits` (`[b, V]`)."""
        if not rows:
            return
        B = logits.shape[0]
        seeds, counts = np.zeros(B, np.int32), np.zeros(B, np.int32)
        temp, top_p = np.zeros(B, np.float32), np.ones(B, np.float32)
        top_k = np.zeros(B, np.int32)
        for j, r in rows:
            s = j.sampling
            seeds[r], counts[r] = s.seed % 2**31, len(j.tokens)  # tokens drawn so far
            temp[r], top_k[r], top_p[r] = s.temperature, s.top_k, s.top_p
        nxt = self.engine.sample_rows(logits, seeds, counts, temp, top_k, top_p)
        host = np.asarray(logits) if any(j.return_logits for j, _ in rows) else None
        now = time.perf_counter()
        for j, r in rows:
            t = int(nxt[r])
            if j.return_logits:
                j.step_logits.append(host[r].copy())
            if j.first_token_at is None:
                j.first_token_at = now
            if t in j.stop_tokens:
                if j.keep_stop:
                    self._emit(j, t)
                self._finish(j, "stop")
            else:
                self._emit(j, t)
                if len(j.tokens) >= j.max_new_tokens:
                    self._finish(j, "length")
                else:
                    j.pending = t

    def _emit(self, job: Job, token: int) -> None:
        job.tokens.append(token)
        self.generated_tokens += 1
        if job.on_token is not None:
            job.on_token(job, token)

    def _finish(self, job: Job, reason: str) -> None:
        """Free the job's pages and memory reads at once; then tell its owner. The slot is
        emptied last: another thread that sees the scheduler idle sees everything freed."""
        self.engine.free_pages(job.pages)
        self.engine.memories.release(list(job.memory_keys))
        job.pages, job.mem_slots = [], []
        if job.slot is not None:
            self.slots[job.slot] = None
            job.slot = None
        job.finish_reason = reason
        job.finished_at = time.perf_counter()
        if job.on_finish is not None:
            job.on_finish(job)
