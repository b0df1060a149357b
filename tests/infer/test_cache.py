"""Page pool accounting, block tables, the empty cache and page writes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from grc_jax.core.errors import OutOfPagesError, UsageError
from grc_jax.infer.cache import PagePool, block_table, empty_cache
from grc_jax.infer.engine import Engine
from grc_jax.infer.paged import write_pages
from tests.infer.conftest import MODEL, OPTS, replace


def test_alloc_free_accounting():
    pool = PagePool(n_pages=10, page_size=4)
    assert pool.free_pages == 9  # page 0 is reserved
    a = pool.alloc(0, 9)  # 3 pages
    b = pool.alloc(1, 4)  # exactly one page
    c = pool.alloc(2, 0)  # even an empty request holds a page
    assert (len(a), len(b), len(c)) == (3, 1, 1)
    assert pool.free_pages == 4
    assert len(set(a + b + c)) == 5 and 0 not in a + b + c
    assert all(pool.owner[p] == 0 for p in a) and pool.owner[b[0]] == 1
    pool.free(a)
    assert pool.free_pages == 7 and not any(p in pool.owner for p in a)
    pool.free(b + c)
    assert pool.free_pages == 9 and pool.owner == {}


def test_page_zero_is_never_handed_out():
    pool = PagePool(n_pages=6, page_size=2)
    for _ in range(3):  # alloc everything, free, again: page 0 never appears
        pages = pool.alloc(0, 10)
        assert sorted(pages) == [1, 2, 3, 4, 5]
        with pytest.raises(OutOfPagesError):
            pool.alloc(1, 1)
        pool.free(pages)


def test_double_free_and_foreign_pages_raise():
    pool = PagePool(n_pages=4, page_size=4)
    pages = pool.alloc(0, 4)
    pool.free(pages)
    with pytest.raises(ValueError, match="not allocated"):
        pool.free(pages)
    with pytest.raises(ValueError, match="page 0"):
        pool.free([0])
    assert pool.free_pages == 3


def test_out_of_pages_message_and_state():
    pool = PagePool(n_pages=5, page_size=4)
    pool.alloc(0, 8)
    with pytest.raises(OutOfPagesError) as err:
        pool.alloc(7, 13)
    msg = str(err.value)
    assert "request 7" in msg and "4 pages" in msg and "2 free" in msg
    assert pool.free_pages == 2  # a failed alloc takes nothing
    with pytest.raises(ValueError, match="n_pages"):
        PagePool(n_pages=1, page_size=4)


def test_block_table():
    np.testing.assert_array_equal(block_table([5, 2], 4), [5, 2, 0, 0])
    assert block_table([3], 1).dtype == np.int32
    with pytest.raises(OutOfPagesError, match="block table"):
        block_table([1, 2, 3], 2)


def test_empty_cache_shape():
    cache = empty_cache(MODEL, n_pages=7, page_size=4)
    want = (MODEL.n_layers, 7, 4, MODEL.n_kv_heads, MODEL.head_dim)
    assert cache["k"].shape == cache["v"].shape == want


def test_write_pages_scatters_by_text_index():
    rng = np.random.default_rng(0)
    pages = np.full((6, 3, 2, 4), np.nan, np.float32)
    new = rng.normal(size=(2, 4, 2, 4)).astype(np.float32)
    tables = np.array([[4, 1, 0], [2, 5, 3]], np.int32)
    index = np.array([[2, 3, 4, -1], [6, 7, -1, -1]], np.int32)  # -1: padding, not written
    out = np.asarray(
        write_pages(jnp.asarray(pages), jnp.asarray(new), jnp.asarray(tables), jnp.asarray(index))
    )
    want = pages.copy()
    for b in range(2):
        for i in range(4):
            if index[b, i] >= 0:
                want[tables[b, index[b, i] // 3], index[b, i] % 3] = new[b, i]
    np.testing.assert_array_equal(out, want)
    assert np.isnan(out[0]).all()  # page 0 untouched by padding


def test_engine_short_of_pages_runs_in_turns_and_refuses_what_never_fits(cfg_ind, params, tok):
    """Three requests of 3 pages with 7 free: two run, the third waits for their pages (same
    tokens as alone). A request that needs more pages than the pool has is refused up front,
    and the requests before it release everything."""
    small = Engine(cfg_ind, params, tok, replace(OPTS, n_pages=8))
    prompts = [[tok.bos_id, 5 + i, *[7] * 8] for i in range(3)]  # + 2 new: 3 pages each
    got = small.generate_ids(prompts, max_new_tokens=2, stop_tokens=())
    alone = [small.generate_ids([p], max_new_tokens=2, stop_tokens=())[0] for p in prompts]
    assert [g.tokens for g in got] == [a.tokens for a in alone]
    assert small.pool.free_pages == 7 and small.pool.owner == {}
    tiny = Engine(cfg_ind, params, tok, replace(OPTS, n_pages=4))
    with pytest.raises(UsageError, match="need 4 pages, the pool has 3"):
        tiny.generate_ids([[1, 2], [tok.bos_id] * 12], max_new_tokens=2)
    assert tiny.pool.free_pages == 3 and tiny.memories.held == 0
