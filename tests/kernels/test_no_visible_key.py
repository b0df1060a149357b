"""A query that sees no key returns exactly 0 in every implementation of hybrid paged attention.

Such queries are real: the engine's decode batch keeps finished requests and idle slots (text
index -1, no memories), and prefill chunks are padded with index -1 tokens. The reference used to
average the masked values there while the kernels returned 0; the contract is now 0 everywhere
(the convention of the training attention too), and rows that do see keys are unchanged: they
equal a float64 softmax over exactly their visible keys.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.hybrid_paged_attention.gpu import hybrid_paged_attention_gpu
from pallas_kernels.hybrid_paged_attention.reference import hybrid_paged_attention_reference
from pallas_kernels.hybrid_paged_attention.tpu import hybrid_paged_attention_tpu
from tests.kernels.test_tpu_kernel import INTERPRET, PAGE_SIZE, Case, make_inputs

CASE = Case(
    "no_visible_key",
    lengths=(13, 10, 0, 5),
    mem_counts=(1, 0, 0, 2),
    hk=2,
    g=2,
    d=64,
    width=3,
    max_mem=2,
    pages_per_block=2,
    # row 0 sees everything; row 1 is a finished request (index -1, stored text, no memories);
    # row 2 an idle slot (nothing at all); row 3 a padding token of a request with memories,
    # which sees its memories only.
    lag=(0, 10, 0, 5),
)
BLIND_ROWS = [1, 2]


def _softmax_oracle(args) -> np.ndarray:
    """Attention of each query over exactly its visible keys, float64 loops; 0 without keys."""
    q, q_text_index, k_pages, v_pages, block_tables, text_lengths, mem_k, mem_v = (
        np.asarray(a, np.float64) if i in (0, 2, 3, 6, 7) else np.asarray(a)
        for i, a in enumerate(args[:8])
    )
    mem_tables, mem_counts, inv_freq = (np.asarray(a) for a in args[8:])
    b, t, hq, d = q.shape
    hk, num_latents = k_pages.shape[2], mem_k.shape[1]
    g = hq // hk
    out = np.zeros(q.shape)
    for row in range(b):
        for i in range(t):
            for h in range(hq):
                kv, qv = h // g, q[row, i, h]
                keys, values = [], []
                for j in range(mem_counts[row]):
                    angle = -j * num_latents * inv_freq.astype(np.float64)
                    cos, sin = np.tile(np.cos(angle), 2), np.tile(np.sin(angle), 2)
                    q_rot = qv * cos + np.concatenate([-qv[d // 2 :], qv[: d // 2]]) * sin
                    mem = mem_tables[row, j]
                    keys += [mem_k[mem, :, kv] @ q_rot]
                    values += [mem_v[mem, :, kv]]
                for pos in range(min(q_text_index[row, i] + 1, text_lengths[row])):
                    page = block_tables[row, pos // PAGE_SIZE]
                    keys += [k_pages[page, pos % PAGE_SIZE, kv][None] @ qv]
                    values += [v_pages[page, pos % PAGE_SIZE, kv][None]]
                if not keys:
                    continue  # no visible key: 0
                scores = np.concatenate(keys) * d**-0.5
                p = np.exp(scores - scores.max())
                out[row, i, h] = (p / p.sum()) @ np.concatenate(values)
    return out


def test_blind_queries_return_zero_in_every_implementation():
    args = make_inputs(CASE, np.random.default_rng(13))
    want = _softmax_oracle(args)
    assert (want[BLIND_ROWS] == 0).all() and (np.abs(want[[0, 3]]) > 0).all()
    with pltpu.force_tpu_interpret_mode(INTERPRET):
        tpu_out = hybrid_paged_attention_tpu(*args, pages_per_block=CASE.pages_per_block)
    results = {
        "reference": hybrid_paged_attention_reference(*args),
        "tpu": tpu_out,
        "gpu": hybrid_paged_attention_gpu(
            *args, pages_per_block=CASE.pages_per_block, num_splits=2, interpret=True
        ),
    }
    for name, got in results.items():
        got = np.asarray(got)
        assert np.isfinite(got).all(), name
        np.testing.assert_array_equal(got[BLIND_ROWS], 0.0, err_msg=name)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=name)


def test_blind_padding_tokens_of_a_prefill_chunk_return_zero():
    """The reference serves prefill chunks: padding tokens (index -1) of a request without
    memories see nothing and return 0; the chunk's real tokens are unchanged."""
    case = dataclasses.replace(CASE, lengths=(13, 10), mem_counts=(1, 0), lag=None)
    args = list(make_inputs(case, np.random.default_rng(7)))
    q = args[0]
    args[0] = jnp.concatenate([q, q[:, ::-1] * 0.5, q * -1.0], axis=1)  # 3 query tokens
    last = np.asarray(args[1])[:, 0]
    args[1] = jnp.asarray(np.stack([last - 2, np.full_like(last, -1), last], axis=1))
    want = _softmax_oracle(args)
    assert (want[1, 1] == 0).all() and (np.abs(want[0, 1]) > 0).all()  # row 0 has a memory
    got = np.asarray(hybrid_paged_attention_reference(*args))
    np.testing.assert_array_equal(got[1, 1], 0.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
