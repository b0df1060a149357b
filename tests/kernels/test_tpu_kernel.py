"""The Pallas TPU hybrid paged attention kernel against the reference, in the TPU interpreter (CPU).

Every case draws fresh random inputs; everything the kernel must not read holds NaN (unallocated /
freed pages, page rows past a sequence's length, unused memory-pool entries) and unused table
entries hold out-of-range or negative ids, so a stray read shows up as NaN or as the interpreter's
out-of-bounds error. The interpreter runs with race detection and NaN-initialised scratch.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

try:  # the race detector only records what it finds; 0.10.2 exposes that state privately
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as _interpreter
except ImportError:  # pragma: no cover
    _interpreter = None

from pallas_kernels.hybrid_paged_attention.reference import hybrid_paged_attention_reference
from pallas_kernels.hybrid_paged_attention.tpu import hybrid_paged_attention_tpu

PAGE_SIZE = 8
INTERPRET = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    lengths: tuple[int, ...]  # text tokens per sequence (including the current one)
    mem_counts: tuple[int, ...]
    hk: int = 1
    g: int = 1
    d: int = 64
    dtype: type = jnp.float32
    width: int = 4  # block-table width (max pages per sequence)
    max_mem: int = 2
    num_latents: int = 8
    pages_per_block: int = 2
    # q_text_index = lengths - 1 - lag: a query may see less than the whole stored text.
    lag: tuple[int, ...] | None = None


CASES = [
    Case("b1_no_memories_mid_page", lengths=(13,), mem_counts=(0,), width=3),
    Case(
        "b3_mixed_gqa2_d128",
        lengths=(16, 5, 27),  # page boundary, inside the first page, mid-page of page 4
        mem_counts=(2, 0, 1),
        hk=2,
        g=2,
        d=128,
        width=5,  # not a multiple of pages_per_block
        pages_per_block=2,
    ),
    Case(
        "b1_memories_and_one_token_bf16_gqa4",
        lengths=(1,),
        mem_counts=(3,),
        g=4,
        max_mem=3,
        dtype=jnp.bfloat16,
    ),
    Case(
        "b3_gqa8_d128_bf16_wide_blocks",
        lengths=(40, 9, 17),
        mem_counts=(1, 2, 0),
        g=8,
        d=128,
        dtype=jnp.bfloat16,
        width=7,
        pages_per_block=3,
    ),
    Case(
        "b3_causal_cut_padding_row_and_empty_row",
        lengths=(20, 6, 0),
        mem_counts=(1, 2, 0),
        hk=2,
        g=2,
        width=4,
        pages_per_block=4,
        lag=(5, 6, 0),  # row 0 sees 15 tokens; row 1 is padding (index -1): memories only
    ),
]


def make_inputs(case: Case, rng: np.random.Generator):
    """Random decode inputs in the engine's layout, with NaN wherever nothing may be read."""
    b = len(case.lengths)
    hq, d = case.hk * case.g, case.d
    n_pool_pages = b * case.width + 3
    n_pool_mems = b * case.max_mem + 2

    def normal(*shape, scale=1.0):
        return rng.standard_normal(shape).astype(np.float32) * scale

    k_pages = np.full((n_pool_pages, PAGE_SIZE, case.hk, d), np.nan, np.float32)
    v_pages = np.full_like(k_pages, np.nan)
    block_tables = np.zeros((b, case.width), np.int32)
    free_pages = rng.permutation(n_pool_pages)
    for row, length in enumerate(case.lengths):
        n_used = -(-length // PAGE_SIZE)
        pages, free_pages = free_pages[:n_used], free_pages[n_used:]
        garbage = rng.choice([n_pool_pages + 50, -7, 10**6], size=case.width - n_used)
        block_tables[row] = np.concatenate([pages, garbage])
        for i, page in enumerate(pages):
            rows = min(PAGE_SIZE, length - i * PAGE_SIZE)  # rows past the length stay NaN
            k_pages[page, :rows] = normal(rows, case.hk, d)
            v_pages[page, :rows] = normal(rows, case.hk, d)

    mem_shape = (n_pool_mems, case.num_latents, case.hk, d)
    mem_k = np.full(mem_shape, np.nan, np.float32)
    mem_v = np.full(mem_shape, np.nan, np.float32)
    mem_tables = np.zeros((b, case.max_mem), np.int32)
    free_mems = rng.permutation(n_pool_mems)
    for row, count in enumerate(case.mem_counts):
        mems, free_mems = free_mems[:count], free_mems[count:]
        garbage = rng.choice([n_pool_mems + 9, -3], size=case.max_mem - count)
        mem_tables[row] = np.concatenate([mems, garbage])
        mem_k[mems] = normal(count, *mem_shape[1:])
        mem_v[mems] = normal(count, *mem_shape[1:])

    lag = case.lag or (0,) * b
    q_text_index = np.array([[max(n - 1 - s, -1)] for n, s in zip(case.lengths, lag)], np.int32)
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, d, 2, dtype=np.float32) / d))
    as_dtype = lambda x: jnp.asarray(x, case.dtype)  # noqa: E731
    return (
        as_dtype(normal(b, 1, hq, d, scale=2.0)),  # sharper attention: stray keys show up
        jnp.asarray(q_text_index),
        as_dtype(k_pages),
        as_dtype(v_pages),
        jnp.asarray(block_tables),
        jnp.asarray(case.lengths, jnp.int32),
        as_dtype(mem_k),
        as_dtype(mem_v),
        jnp.asarray(mem_tables),
        jnp.asarray(case.mem_counts, jnp.int32),
        jnp.asarray(inv_freq),
    )


# The longest interpreted cases run in `make test-all` only (bf16 and GQA with head_dim 128 stay
# covered by b3_gqa8_d128_bf16_wide_blocks).
SLOW_CASES = {"b1_memories_and_one_token_bf16_gqa4", "b3_mixed_gqa2_d128"}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.name, marks=[pytest.mark.slow] * (c.name in SLOW_CASES)) for c in CASES],
)
def test_matches_reference(case: Case):
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    args = make_inputs(case, rng)
    expected = hybrid_paged_attention_reference(*args)
    with pltpu.force_tpu_interpret_mode(INTERPRET):
        got = hybrid_paged_attention_tpu(*args, pages_per_block=case.pages_per_block)
    races = getattr(_interpreter, "races", None)
    assert races is None or not races.races_found, "the interpreter detected a data race"
    assert got.shape == expected.shape and got.dtype == expected.dtype
    got32, expected32 = np.asarray(got, np.float32), np.asarray(expected, np.float32)
    assert np.isfinite(expected32).all()
    assert np.isfinite(got32).all()
    np.testing.assert_allclose(got32, expected32, rtol=0, atol=TOLERANCE[case.dtype])


def test_rejects_prefill():
    case = dataclasses.replace(CASES[0], name="prefill")
    args = list(make_inputs(case, np.random.default_rng(0)))
    args[0] = jnp.concatenate([args[0]] * 2, axis=1)
    args[1] = jnp.concatenate([args[1]] * 2, axis=1)
    with pytest.raises(ValueError, match="decode-only"):
        hybrid_paged_attention_tpu(*args)
