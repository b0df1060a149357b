"""Embedding passes pack short texts several to a row: every text lands once, rows hold what
they can, and a text's embedding does not depend on the texts packed beside it."""

from __future__ import annotations

import numpy as np
import pytest

from grc_jax.data.layout import latents, text
from grc_jax.infer.encode_batches import (
    ENCODE_BATCH,
    PACK_LEN,
    _first_fit_decreasing,
    packed_batches,
    row_bucket,
)


def test_row_bucket_is_a_power_of_two_then_a_multiple_of_eight():
    got = [row_bucket(n) for n in (1, 2, 3, 5, 8, 9, 17, 63, 64)]
    assert got == [1, 2, 4, 8, 8, 16, 24, 64, 64]


def test_first_fit_decreasing_respects_room_and_slots():
    rng = np.random.default_rng(0)
    lengths = {i: int(n) for i, n in enumerate(rng.integers(6, 100, 300))}
    bins = _first_fit_decreasing(lengths, 128, 5)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 128 and len(b) <= 5 for b in bins)
    # Nearly full: within a bin or two of the bound the total length gives.
    assert len(bins) <= sum(lengths.values()) / 128 + 2


def test_packed_batches_place_every_example_once():
    rng = np.random.default_rng(1)
    k = 4
    examples = [[[text(rng.integers(3, 50, int(n)).tolist()), latents(k)]]
                for n in rng.integers(1, 200, 150)]  # fmt: skip
    seen = []
    for idx, at, rows, slots in packed_batches(examples, k, "independent"):
        assert rows.tokens.shape[0] == row_bucket(len(set(at[:, 0].tolist())))
        assert rows.tokens.shape[0] <= ENCODE_BATCH and at[:, 1].max() < slots
        for i, (r, s) in zip(idx, at):
            n = sum(len(sp.tokens) for sp in examples[i][0])
            seg = rows.segment_ids[r] == s + 1
            assert seg.sum() == n  # the whole example, in its own segment
            np.testing.assert_array_equal(rows.tokens[r, seg][: n - k], examples[i][0][0].tokens)
        seen += idx
    assert sorted(seen) == list(range(len(examples)))
    assert any(n > PACK_LEN for n in (sum(len(sp.tokens) for sp in e[0]) for e in examples))


@pytest.mark.parametrize("which", ["engine", "engine_rec"])
def test_an_embedding_does_not_depend_on_its_row_mates(request, which):
    """Texts of mixed lengths (some packed several to a row, some longer than a packed row),
    embedded together, equal each embedded alone (independent and recurrent memory modes)."""
    engine = request.getfixturevalue(which)
    rng = np.random.default_rng(2)
    texts = [" ".join(rng.choice(list("abcdefghijk"), int(n))) for n in rng.integers(1, 70, 24)]
    lengths = [len(engine.tok.encode(t)) + 1 + engine.K for t in texts]
    assert min(lengths) * 2 <= PACK_LEN < max(lengths)
    together = engine.embed(texts)
    alone = np.concatenate([engine.embed([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
