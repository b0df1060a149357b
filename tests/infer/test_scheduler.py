"""Continuous batching (`Scheduler`) and the shared memory pool: requests that join and leave the
batch between steps give exactly what each gives alone, and nothing leaks."""

from __future__ import annotations

import numpy as np
import pytest

from grc_jax.infer.engine import Engine
from grc_jax.infer.memory_pool import MemoryPool, MemoryPoolFullError
from grc_jax.infer.sampling import SamplingParams
from grc_jax.infer.scheduler import (
    Job,
    QueueFullError,
    Scheduler,
    _rows_for,
    prefill_rows,
    programs,
    warm_up,
)
from tests.infer.conftest import OPTS, replace


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(3, 64, int(rng.integers(0, 24))).tolist()] for _ in range(n)]


@pytest.fixture(scope="module")
def poisoned(cfg_ind, params, tok) -> Engine:
    """An engine that fills every page freed by a finished request with NaN."""
    return Engine(cfg_ind, params, tok, replace(OPTS, poison_freed_pages=True, memory_slots=5))


def test_continuous_batching_gives_each_request_what_it_gives_alone(poisoned, engine, compressed):
    """Twelve greedy requests of mixed lengths, four reading named memories, join a running batch
    of three slots at different steps; freed pages are NaN-poisoned. Each request's tokens equal a
    lone run on a fresh engine, and the logits that chose them agree to fp32 rounding (a prompt
    read in a prefill program of another row count runs in another summation order); afterwards
    every page is free and only the named memories stay held, read by nobody."""
    mems = [m for m, _ in compressed]
    for i, m in enumerate(mems):
        poisoned.memories.put(f"mem-{i}", m, named=True)
    prompts = _prompts(12)
    reads = [[], ["mem-0"], [], ["mem-1", "mem-2"], [], [], ["mem-2"], [], [], ["mem-0"], [], []]
    budgets = [3, 9, 1, 6, 12, 2, 5, 8, 4, 7, 10, 3]
    sched = Scheduler(poisoned)
    jobs = [
        Job(p, n, stop_tokens=(), memory_keys=tuple(r), return_logits=True)
        for p, r, n in zip(prompts, reads, budgets)
    ]
    arrivals = {0: jobs[:2], 1: jobs[2:5], 4: jobs[5:6], 9: jobs[6:10], 15: jobs[10:]}
    step = 0
    while step in arrivals or not all(j.done for j in jobs):
        for j in arrivals.get(step, []):
            sched.submit(j)
        sched.step()
        step += 1
    assert sched.steps["prefill"] > 0 and sched.steps["decode"] > 0
    for j, p, r, n in zip(jobs, prompts, reads, budgets):
        (alone,) = engine.generate_ids(
            [p], [[mems[int(k[-1])] for k in r]], max_new_tokens=n, stop_tokens=(),
            return_logits=True,
        )  # fmt: skip
        assert j.finish_reason == "length" and j.tokens == alone.tokens
        np.testing.assert_allclose(
            np.stack(j.step_logits), np.stack(alone.step_logits), atol=1e-5, rtol=0
        )
    assert poisoned.pool.free_pages == OPTS.n_pages - 1
    assert poisoned.memories.held == 3 and poisoned.memories.read == 0


def test_cancel_frees_pages_and_memory_reads_at_once(engine, compressed):
    m = compressed[0][0]
    engine.memories.put("doc", m, named=True)
    sched = Scheduler(engine)
    a = sched.submit(Job([1, 7, 8], 30, stop_tokens=(), memory_keys=("doc",)))
    b = sched.submit(Job(_prompts(1, 1)[0], 5, stop_tokens=()))
    for _ in range(4):
        sched.step()
    assert a.tokens and not a.done
    sched.cancel(a)
    sched.step()
    assert a.finish_reason == "cancelled" and a.pages == []
    while not b.done:
        sched.step()
    assert engine.pool.free_pages == OPTS.n_pages - 1
    assert engine.memories.read == 0
    # A job cancelled while it waits never takes pages.
    sched.submit(Job(_prompts(1)[0], 4, stop_tokens=())).cancelled = True
    sched.step()
    assert sched.idle and engine.pool.free_pages == OPTS.n_pages - 1
    engine.memories.delete("doc")


def test_waiting_for_pages_and_the_queue_bound(cfg_ind, params, tok):
    """With pages for one long request at a time, the second waits (first come, first served)
    until the first finishes; past `max_queue` waiting requests, submit raises."""
    small = Engine(cfg_ind, params, tok, replace(OPTS, n_pages=10, max_batch=2))
    sched = Scheduler(small, max_queue=3)
    long = [1, *range(3, 30)]  # 28 tokens + 8 new = 9 pages of 4: all there are
    a = sched.submit(Job(long, 8, stop_tokens=()))
    b = sched.submit(Job(long, 8, stop_tokens=()))
    c = sched.submit(Job([1, 5], 2, stop_tokens=()))
    with pytest.raises(QueueFullError):
        sched.submit(Job([1, 5], 2, stop_tokens=()))
    sched.step()
    assert a.slot is not None and b.slot is None and c.slot is None  # c waits behind b
    while not a.done:
        sched.step()
        assert b.slot is None or a.done
    while not (b.done and c.done):
        sched.step()
    assert b.tokens == a.tokens and small.pool.free_pages == 9
    with pytest.raises(ValueError, match="need 10 pages, the pool has 9"):
        sched.submit(Job(list(range(1, 40)), 1))


def test_static_policy_admits_only_into_an_empty_batch(engine):
    sched = Scheduler(engine, policy="static")
    jobs = [sched.submit(Job(p, n, stop_tokens=())) for p, n in zip(_prompts(4), [2, 6, 2, 2])]
    sched.step()
    assert [j.slot is not None for j in jobs] == [True, True, True, False]
    while not jobs[0].done:
        sched.step()
    assert jobs[3].slot is None  # job 1 still runs: the batch is not empty yet
    while not all(j.done for j in jobs):
        sched.step()
    assert engine.pool.free_pages == OPTS.n_pages - 1


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    s = SamplingParams(temperature=1.0, top_k=8, seed=11)
    p = _prompts(3, 2)
    alone = Scheduler(engine).run([Job(p[0], 8, s, stop_tokens=())])[0].tokens
    crowd = Scheduler(engine).run([Job(q, 8, s, stop_tokens=()) for q in [p[1], p[0], p[2]]])
    assert crowd[1].tokens == alone


# --------------------------------------------------------------------------- memory pool


def _mem(engine, compressed, i):
    return compressed[i % len(compressed)][0]


def test_memory_pool_is_reference_counted_and_evicts_least_recently_used(engine, compressed):
    pool = MemoryPool(2, *engine.mem_pool["k"].shape[:1], engine.K, *engine.mem_pool["k"].shape[3:])
    m0, m1, m2 = (_mem(engine, compressed, i) for i in range(3))
    s0 = pool.put("a", m0, named=True)
    assert pool.put("a", m0, named=True) == s0 and pool.held == 1  # held once
    pool.put("b", m1, named=True)
    pool.acquire(["a"])  # "a" is read: "b" is the one to evict, though "a" is older
    pool.put("c", m2, named=True)
    assert "b" not in pool and pool.was_evicted("b") and pool.evictions == 1
    np.testing.assert_array_equal(np.asarray(pool.arrays["k"][:, pool.slot("c")]), m2.k)
    pool.acquire(["c"])
    with pytest.raises(MemoryPoolFullError, match="all 2 slots"):
        pool.put("d", m1, named=True)
    # Deleting a memory that is read takes its name now and its slot when the reader leaves.
    assert pool.delete("a") and "a" not in pool and pool.held == 2
    pool.release(["a"])
    assert pool.held == 1 and pool.free_slots == 1
    pool.release(["c"])
    with pytest.raises(ValueError, match="released more often"):
        pool.release(["c"])
    assert not pool.delete("zzz")


def test_engine_memories_live_only_while_read(engine, compressed):
    mems = [m for m, _ in compressed]
    before = engine.memories.held
    engine.generate_ids([[1, 5, 6]], memories=[mems[:2]], max_new_tokens=2)
    assert engine.memories.held == before and engine.memories.read == 0


def test_prefill_rows_fit_the_jobs_that_prefill():
    assert prefill_rows(8) == (1, 2, 4, 8) and prefill_rows(6) == (1, 2, 4, 6)
    assert prefill_rows(1) == (1,)
    sizes = prefill_rows(16)
    got = {n: _rows_for(n, sizes) for n in range(1, 17)}
    # The smallest program that holds them, unless over a quarter of it would be empty.
    assert got == {1: 1, 2: 2, 3: 4, 4: 4, 5: 4, 6: 8, 7: 8, 8: 8, 9: 8, 10: 8, 11: 8, 12: 16,
                   13: 16, 14: 16, 15: 16, 16: 16}  # fmt: skip


def test_the_generation_programs_are_fixed(engine):
    """After `warm_up`, however requests come and go (one at a time, several at once), the
    generation step keeps exactly its programs: one decode, one prefill per row count."""
    warm_up(engine)
    n = engine._gen_step._cache_size()
    assert n == len(programs(engine)) == len(prefill_rows(engine.opts.max_batch)) + 1
    Scheduler(engine).run([Job(p, 3, stop_tokens=()) for p in _prompts(5, 3)])
    sched = Scheduler(engine)
    for i, p in enumerate(_prompts(7, 4)):
        sched.submit(Job(p, 1 + i % 4, SamplingParams(temperature=0.5 * (i % 2)), ()))
        sched.step()
    while not sched.idle:
        sched.step()
    assert sched.steps["prefill"] > 0
    assert engine._gen_step._cache_size() == n
