"""The Mosaic GPU hybrid paged attention kernel against the reference, in Mosaic GPU's interpreter.

Every case draws fresh random inputs; stale pages and tokens, unused memory-pool entries and the
targets of unused block-table / memory-table slots hold NaN, so anything read past the lengths
shows up in the result. Each case compiles once and runs two draws: a hand-picked one (named
edge cases) and a random one (same shapes, random lengths and memory counts).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.hybrid_paged_attention import gpu
from pallas_kernels.hybrid_paged_attention.gpu import hybrid_paged_attention_gpu
from pallas_kernels.hybrid_paged_attention.reference import hybrid_paged_attention_reference

TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
_reference = jax.jit(hybrid_paged_attention_reference)


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: str
    batch: int
    kv_heads: int
    group: int  # query heads per KV head
    head_dim: int
    page_size: int
    pages_per_block: int
    max_pages: int  # block-table width
    latents: int  # K, tokens per memory
    max_mem: int  # memory-table width
    num_splits: int | None
    lengths: tuple[int, ...]  # text tokens per sequence in the hand-picked draw
    mem_counts: tuple[int, ...]
    causal_gap: tuple[int, ...]  # text_lengths - 1 - q_text_index (tokens past the query)


CASES = {
    # batch 1, no memories, length ends mid-page, width 3 not a multiple of 4 pages per block,
    # three splits over a single tile (two splits empty).
    "f32-g1-d64-nomem-split3": Case("float32", 1, 1, 1, 64, 16, 4, 3, 16, 2, 3, (37,), (0,), (0,)),
    # one split; an idle sequence (no text, no memories); a query that sees only part of the
    # text written so far; page_size 8 with 8 pages per block.
    "f32-g2-d128-split1": Case(
        "float32", 3, 2, 2, 128, 8, 8, 10, 16, 3, 1, (75, 0, 9), (3, 0, 1), (0, 0, 2)
    ),
    # only memories and a 1-token text; more splits than text pages; K = 72 latents make the
    # tiles 128 rows, so a 64-token text tile leaves 64 rows of stale SMEM.
    "f32-g4-d64-memonly-split3": Case(
        "float32", 2, 1, 4, 64, 16, 4, 2, 72, 4, 3, (1, 1), (4, 2), (0, 0)
    ),
    # GQA 8, K = 8 latents in a 64-row tile, 2 pages of 32 per block, width 5.
    "f32-g8-d64-split2": Case("float32", 2, 2, 8, 64, 32, 2, 5, 8, 2, 2, (150, 33), (1, 2), (0, 1)),
    # 3 pages of 8 tokens per block: 24-token text tiles padded to 64 rows.
    "bf16-g4-d128-split2": Case(
        "bfloat16", 2, 2, 4, 128, 8, 3, 7, 16, 3, 2, (50, 17), (2, 3), (0, 0)
    ),
    # num_splits=None: the heuristic picks min(SMs / programs, tiles) = 4 splits here.
    "bf16-g8-d64-auto": Case("bfloat16", 1, 2, 8, 64, 16, 4, 6, 64, 2, None, (90,), (2,), (0,)),
}


def _inputs(case: Case, seed: int, lengths, mem_counts, causal_gap):
    """Reference arguments with every unused or stale slot pointing at NaN."""
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(case.dtype)
    b, ps, mp, hk, d = case.batch, case.page_size, case.max_pages, case.kv_heads, case.head_dim
    lengths, mem_counts, causal_gap = map(np.asarray, (lengths, mem_counts, causal_gap))

    n_pool_pages = b * mp + 3  # some pages belong to nobody: stale, NaN
    block_tables = rng.permutation(n_pool_pages)[: b * mp].reshape(b, mp)
    live = np.zeros((n_pool_pages, ps), bool)
    for i in range(b):
        for tok in range(lengths[i]):
            live[block_tables[i, tok // ps], tok % ps] = True
    stale_pages = np.flatnonzero(~live.any(axis=1))
    for i in range(b):  # slots past the last page: NaN pages and ids outside the pool
        for j in range(-(-lengths[i] // ps), mp):
            block_tables[i, j] = rng.choice([*stale_pages, n_pool_pages + 7, -3, 10**6])

    def pool(shape, live_mask):
        x = rng.standard_normal(shape).astype(np.float32)
        x[~live_mask] = np.nan
        return jnp.asarray(x, dtype)

    k_pages = pool((n_pool_pages, ps, hk, d), live)
    v_pages = pool((n_pool_pages, ps, hk, d), live)

    n_used = b * case.max_mem + 1
    n_pool_mem = n_used + 2  # the last entries are never referenced by a used slot: NaN
    mem_live = np.arange(n_pool_mem) < n_used
    mem_k = pool((n_pool_mem, case.latents, hk, d), mem_live)
    mem_v = pool((n_pool_mem, case.latents, hk, d), mem_live)
    mem_tables = rng.integers(0, n_used, (b, case.max_mem))  # memories may be shared
    for i in range(b):
        for j in range(mem_counts[i], case.max_mem):
            mem_tables[i, j] = rng.choice([n_used, n_used + 1, -1, 10**6])

    hq = hk * case.group
    q = jnp.asarray(rng.standard_normal((b, 1, hq, d)), dtype)
    q_text_index = (lengths - 1 - causal_gap)[:, None]
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, d, 2) / d))
    i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    return (
        q, i32(q_text_index), k_pages, v_pages, i32(block_tables), i32(lengths),
        mem_k, mem_v, i32(mem_tables), i32(mem_counts), jnp.asarray(inv_freq, jnp.float32),
    )  # fmt: skip


def _random_draw(case: Case, rng: np.random.Generator):
    """Lengths, memory counts and causal gaps for a random draw of the same shapes."""
    lengths = rng.integers(1, case.max_pages * case.page_size + 1, case.batch)
    mem_counts = rng.integers(0, case.max_mem + 1, case.batch)
    gaps = np.minimum(rng.integers(0, 3, case.batch), lengths - 1)
    return lengths, mem_counts, gaps


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    case = CASES[name]
    kernel = jax.jit(
        functools.partial(
            hybrid_paged_attention_gpu,
            pages_per_block=case.pages_per_block,
            num_splits=case.num_splits,
            interpret=True,
        )
    )
    seed = sum(map(ord, name))
    draws = [(case.lengths, case.mem_counts, case.causal_gap)]
    draws.append(_random_draw(case, np.random.default_rng(seed)))
    for k, draw in enumerate(draws):
        args = _inputs(case, seed + k, *draw)
        want = _reference(*args)
        got = kernel(*args)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert bool(jnp.all(jnp.isfinite(got))), f"draw {k}: non-finite output"
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
        assert err <= TOLERANCE[case.dtype], f"draw {k} {draw}: max abs diff {err}"


@pytest.mark.parametrize("name", list(CASES))
def test_lowers_for_cuda(name):
    """Pallas' Mosaic GPU lowering (layouts, TMA, barriers) accepts the kernel without a GPU."""
    case = CASES[name]
    args = _inputs(case, 0, case.lengths, case.mem_counts, case.causal_gap)
    fn = functools.partial(
        hybrid_paged_attention_gpu, pages_per_block=case.pages_per_block, num_splits=3
    )
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def test_num_splits_heuristic(monkeypatch):
    monkeypatch.setattr(gpu, "_sm_count", lambda: 132)
    assert gpu._pick_num_splits(programs=256, max_tiles=50) == 1  # already fills the GPU
    assert gpu._pick_num_splits(programs=8, max_tiles=50) == 17  # ceil(132 / 8)
    assert gpu._pick_num_splits(programs=8, max_tiles=5) == 5  # no more splits than tiles


def test_rejects_prefill_chunks():
    case = CASES["f32-g1-d64-nomem-split3"]
    args = list(_inputs(case, 0, case.lengths, case.mem_counts, case.causal_gap))
    args[0] = jnp.concatenate([args[0], args[0]], axis=1)
    args[1] = jnp.concatenate([args[1], args[1]], axis=1)
    with pytest.raises(ValueError, match="decode only"):
        hybrid_paged_attention_gpu(*args, interpret=True)
