"""The hybrid paged attention reference against dense masked softmax attention built here.

The dense side is written independently in float64 numpy: text keys gathered page by page, latent
memory j placed at logical positions j*K + k by re-rotating its canonical keys (DESIGN.md 3, 6), and
an explicit list of visible keys per query. Everything the reference must not read (unused pages,
slots past a sequence's length, unused block-table entries, unused memory slots) holds NaN.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grc_jax.model.rope import apply_rope, rope_angles
from pallas_kernels.hybrid_paged_attention import (
    hybrid_paged_attention,
    hybrid_paged_attention_reference,
    rotate,
)

THETA = 10000.0
ATOL = 1e-5
# One compile per shape instead of one per op: eager dispatch is most of the cost on CPU.
reference = jax.jit(hybrid_paged_attention_reference)


def inv_freq_np(d: int) -> np.ndarray:
    return 1.0 / THETA ** (np.arange(0, d, 2, dtype=np.float64) / d)


def rope_np(x: np.ndarray, pos: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of x[..., n, h, d] at positions pos[..., n] (float64)."""
    ang = np.asarray(pos, np.float64)[..., None] * inv_freq  # [..., n, half]
    cos, sin = np.cos(ang)[..., None, :], np.sin(ang)[..., None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@dataclasses.dataclass
class Case:
    q: np.ndarray  # [b, t, hq, d] (already rotated at the query's own position)
    q_text_index: np.ndarray  # [b, t]
    k_pages: np.ndarray
    v_pages: np.ndarray
    block_tables: np.ndarray
    text_lengths: np.ndarray
    mem_k: np.ndarray  # canonical keys
    mem_v: np.ndarray
    mem_tables: np.ndarray
    mem_counts: np.ndarray
    inv_freq: np.ndarray

    def run_reference(self) -> np.ndarray:
        out = reference(
            jnp.asarray(self.q),
            jnp.asarray(self.q_text_index),
            jnp.asarray(self.k_pages),
            jnp.asarray(self.v_pages),
            jnp.asarray(self.block_tables),
            jnp.asarray(self.text_lengths),
            jnp.asarray(self.mem_k),
            jnp.asarray(self.mem_v),
            jnp.asarray(self.mem_tables),
            jnp.asarray(self.mem_counts),
            jnp.asarray(self.inv_freq, jnp.float32),
        )
        return np.asarray(out)


def make_case(
    rng,
    *,
    lengths,
    counts,
    t,
    hk,
    g,
    d=8,
    num_latents=4,
    page_size=4,
    width=None,
    n_slots=None,
    extra_pages=3,
):
    """Random case; all storage the sequences do not own is NaN. Queries are the last `t` text
    tokens of each sequence (index -1, padding, where a sequence is shorter than `t`)."""
    b = len(lengths)
    lengths, counts = np.asarray(lengths), np.asarray(counts)
    needed = [math.ceil(n / page_size) for n in lengths]
    width = width or max(needed)
    n_slots = n_slots or max(1, counts.max())
    assert width >= max(needed) and n_slots >= counts.max()
    n_pages = 1 + sum(needed) + extra_pages  # page 0 and the extras stay NaN
    k_pages = np.full((n_pages, page_size, hk, d), np.nan, np.float32)
    v_pages = np.full_like(k_pages, np.nan)
    owned = rng.permutation(np.arange(1, n_pages))  # shuffled: pages need not be in order
    nan_pages = [0, *owned[sum(needed) :]]
    block_tables = rng.choice(nan_pages, size=(b, width)).astype(np.int32)
    cursor = 0
    for i, n in enumerate(lengths):
        pages = owned[cursor : cursor + needed[i]]
        cursor += needed[i]
        block_tables[i, : needed[i]] = pages
        for s in range(n):
            p, o = pages[s // page_size], s % page_size
            k_pages[p, o] = rng.normal(size=(hk, d))
            v_pages[p, o] = rng.normal(size=(hk, d))
    n_mem = counts.sum() + 2  # two pool rows nobody uses, NaN
    mem_k = np.full((n_mem, num_latents, hk, d), np.nan, np.float32)
    mem_v = np.full_like(mem_k, np.nan)
    used = rng.permutation(n_mem)
    mem_tables = rng.choice(used[counts.sum() :], size=(b, n_slots)).astype(np.int32)
    cursor = 0
    for i, c in enumerate(counts):
        rows = used[cursor : cursor + c]
        cursor += c
        mem_tables[i, :c] = rows
        mem_k[rows] = rng.normal(size=(c, num_latents, hk, d))
        mem_v[rows] = rng.normal(size=(c, num_latents, hk, d))
    q_text_index = np.maximum(lengths[:, None] - t, 0) + np.arange(t)[None, :]
    q_text_index = np.where(q_text_index < lengths[:, None], q_text_index, -1).astype(np.int32)
    return Case(
        q=rng.normal(size=(b, t, hk * g, d)).astype(np.float32),
        q_text_index=q_text_index,
        k_pages=k_pages,
        v_pages=v_pages,
        block_tables=block_tables,
        text_lengths=lengths.astype(np.int32),
        mem_k=mem_k,
        mem_v=mem_v,
        mem_tables=mem_tables,
        mem_counts=counts.astype(np.int32),
        inv_freq=inv_freq_np(d).astype(np.float32),
    )


def dense_attention(c: Case) -> np.ndarray:
    """float64 softmax over the explicitly listed visible keys; NaN rows for padding queries."""
    b, t, hq, d = c.q.shape
    hk = c.k_pages.shape[2]
    g, K, page_size = hq // hk, c.mem_k.shape[1], c.k_pages.shape[1]
    inv_freq = c.inv_freq.astype(np.float64)
    out = np.full((b, t, hq, d), np.nan)
    for i in range(b):
        keys, values = [], []
        for j in range(c.mem_counts[i]):
            row = c.mem_tables[i, j]
            # canonical keys sit at 0..K-1: one more rotation by j*K puts them at j*K + k.
            keys.append(rope_np(c.mem_k[row].astype(np.float64), np.full(K, j * K), inv_freq))
            values.append(c.mem_v[row].astype(np.float64))
        n_mem = sum(len(k) for k in keys)
        for s in range(c.text_lengths[i]):
            p, o = c.block_tables[i, s // page_size], s % page_size
            keys.append(c.k_pages[p, o][None].astype(np.float64))
            values.append(c.v_pages[p, o][None].astype(np.float64))
        keys, values = np.concatenate(keys), np.concatenate(values)  # [n, hk, d]
        for r in range(t):
            qi = c.q_text_index[i, r]
            if qi < 0:
                continue
            n_vis = n_mem + qi + 1  # memories, then text tokens 0..qi (causal)
            for h in range(hq):
                s_ = keys[:n_vis, h // g] @ c.q[i, r, h].astype(np.float64) / math.sqrt(d)
                p_ = np.exp(s_ - s_.max())
                out[i, r, h] = (p_ / p_.sum()) @ values[:n_vis, h // g]
    return out


CASES = {
    # name: (lengths, counts, t, hk, g, extra kwargs)
    "b1_g1_decode": ([7], [2], 1, 2, 1, {}),
    "b3_g2_decode_mixed": ([1, 9, 6], [3, 0, 1], 1, 2, 2, dict(width=5, n_slots=4)),
    "b3_g4_prefill_chunk": ([3, 12, 5], [1, 2, 0], 5, 2, 4, dict(width=6)),
    "b1_g2_one_token_no_memory": ([1], [0], 1, 2, 2, dict(width=3, n_slots=2)),
    "b1_g4_only_memories_plus_query": ([1], [3], 1, 1, 4, dict(num_latents=3, n_slots=5)),
    "b3_g1_page_size_3_k5": (
        [8, 2, 11],
        [1, 2, 2],
        3,
        3,
        1,
        dict(page_size=3, num_latents=5, width=6),
    ),
    "b3_g2_d16_full_pages": ([8, 4, 12], [2, 1, 3], 2, 2, 2, dict(d=16)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_dense(name):
    lengths, counts, t, hk, g, kw = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # stable across processes
    case = make_case(rng, lengths=lengths, counts=counts, t=t, hk=hk, g=g, **kw)
    assert np.isnan(case.k_pages).any() and np.isnan(case.mem_k).any()  # the test has teeth
    got = case.run_reference()
    assert np.isfinite(got).all(), (
        "NaN from storage the sequence does not own leaked into the output"
    )
    want = dense_attention(case)
    valid = case.q_text_index >= 0
    np.testing.assert_allclose(got[valid], want[valid], atol=ATOL, rtol=0)


def test_dispatch_matches_reference_and_rejects_unknown_impl():
    rng = np.random.default_rng(1)
    case = make_case(rng, lengths=[5, 2], counts=[1, 0], t=1, hk=2, g=2)
    args = [jnp.asarray(a) for a in dataclasses.astuple(case)]
    dispatch = jax.jit(hybrid_paged_attention, static_argnames="impl")
    np.testing.assert_allclose(
        np.asarray(dispatch(*args, impl="auto")), case.run_reference(), atol=ATOL, rtol=0
    )
    with pytest.raises(ValueError, match="impl"):
        dispatch(*args, impl="mosaic-typo")


def test_stale_values_beyond_length_do_not_matter():
    """Replacing every NaN by huge finite garbage gives the same output: nothing unowned is read."""
    rng = np.random.default_rng(2)
    case = make_case(rng, lengths=[6, 3, 10], counts=[2, 1, 0], t=2, hk=2, g=2, width=5)
    garbage = dataclasses.replace(
        case,
        k_pages=np.nan_to_num(case.k_pages, nan=1e4),
        v_pages=np.nan_to_num(case.v_pages, nan=-1e4),
        mem_k=np.nan_to_num(case.mem_k, nan=1e4),
        mem_v=np.nan_to_num(case.mem_v, nan=1e4),
    )
    np.testing.assert_allclose(garbage.run_reference(), case.run_reference(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_latents,n_mem,text_len", [(4, 2, 5), (16, 3, 9), (3, 1, 1)])
def test_canonical_memory_equals_keys_at_true_positions(num_latents, n_mem, text_len):
    """DESIGN.md 3: canonical memory keys + query counter-rotation by -m*K == attention over the
    latent keys rotated at their true positions m*K + k (by the training RoPE), text after them."""
    rng = np.random.default_rng(num_latents)
    hk, g, d, page_size = 2, 2, 8, 4
    K = num_latents
    inv_freq = inv_freq_np(d).astype(np.float32)

    def rope(x, pos):  # the training rotation of x [n, h, d] at positions pos [n], one call
        n, h = x.shape[:2]
        cos, sin = rope_angles(jnp.asarray(np.repeat(pos, h), jnp.int32)[None], inv_freq)
        flat = jnp.asarray(x.reshape(1, n * h, 1, d), jnp.float32)
        return np.asarray(apply_rope(flat, cos, sin)).reshape(n, h, d)

    n = n_mem * K
    raw = rng.normal(size=(2 * n + text_len + 1, hk * g, d)).astype(np.float32)
    raw[: 2 * n] = np.concatenate([raw[:n]] * 2)  # the same latent keys, two placements
    text_pos = n_mem * K + np.arange(text_len)  # the consumer block starts at M*K
    positions = np.concatenate(
        [
            np.arange(n),  # at their true positions: memory m, latent k at m*K + k
            np.tile(np.arange(K), n_mem),  # canonical: every memory as if at 0..K-1
            text_pos,
            text_pos[-1:],  # the query is the newest text token
        ]
    )
    rotated = rope(raw, positions)
    true_k = rotated[:n, :hk].reshape(n_mem, K, hk, d)
    canon_k = rotated[n : 2 * n, :hk].reshape(n_mem, K, hk, d)
    text_k = rotated[2 * n : 2 * n + text_len, :hk]
    q = rotated[-1:]  # [1, hq, d]
    mem_v = rng.normal(size=(n_mem, K, hk, d)).astype(np.float32)
    text_v = rng.normal(size=(text_len, hk, d)).astype(np.float32)

    # Dense attention over keys at their true positions.
    keys = np.concatenate([true_k.reshape(-1, hk, d), text_k]).astype(np.float64)
    values = np.concatenate([mem_v.reshape(-1, hk, d), text_v]).astype(np.float64)
    want = np.empty((hk * g, d))
    for h in range(hk * g):
        s = keys[:, h // g] @ q[0, h] / math.sqrt(d)
        p = np.exp(s - s.max())
        want[h] = (p / p.sum()) @ values[:, h // g]

    n_pages = math.ceil(text_len / page_size)
    k_pages = np.full((n_pages + 1, page_size, hk, d), np.nan, np.float32)
    v_pages = np.full_like(k_pages, np.nan)
    for s in range(text_len):
        k_pages[1 + s // page_size, s % page_size] = text_k[s]
        v_pages[1 + s // page_size, s % page_size] = text_v[s]
    got = reference(
        jnp.asarray(q)[None],
        jnp.asarray([[text_len - 1]], jnp.int32),
        jnp.asarray(k_pages),
        jnp.asarray(v_pages),
        jnp.arange(1, n_pages + 1, dtype=jnp.int32)[None],
        jnp.asarray([text_len], jnp.int32),
        jnp.asarray(canon_k),
        jnp.asarray(mem_v),
        jnp.arange(n_mem, dtype=jnp.int32)[None],
        jnp.asarray([n_mem], jnp.int32),
        jnp.asarray(inv_freq),
    )
    np.testing.assert_allclose(np.asarray(got)[0, 0], want, atol=ATOL, rtol=0)
    # Reading the canonical keys without counter-rotation is wrong (the test can tell).
    assert n_mem == 1 or not np.allclose(canon_k[1:], true_k[1:], atol=1e-3)


def test_rotate_matches_training_rope_and_composes():
    rng = np.random.default_rng(3)
    d = 8
    inv_freq = inv_freq_np(d).astype(np.float32)
    x = rng.normal(size=(5, 2, d)).astype(np.float32)
    pos = np.array([-7, 0, 3, 12, 40])
    cos, sin = rope_angles(jnp.asarray(pos, jnp.int32)[None], inv_freq)
    want = np.asarray(apply_rope(jnp.asarray(x)[None], cos, sin)[0])
    angles = jnp.asarray(pos, jnp.float32)[:, None, None] * inv_freq
    np.testing.assert_allclose(np.asarray(rotate(jnp.asarray(x), angles)), want, atol=ATOL)
    np.testing.assert_allclose(want, rope_np(x, pos, inv_freq.astype(np.float64)), atol=ATOL)
    a = jnp.float32(5.0) * inv_freq
    b = jnp.float32(-12.0) * inv_freq
    np.testing.assert_allclose(
        np.asarray(rotate(rotate(jnp.asarray(x), a), b)),
        np.asarray(rotate(jnp.asarray(x), a + b)),
        atol=ATOL,
    )
