"""A record's group of examples: the query and document examples, and the extra layouts, the RAG
example (several memories) and the recurrent chain (a running memory): their blocks, positions
(as inference lays them out), the visibility they get from the mask rule on pipeline-built
batches, and which records get them."""

import jax.numpy as jnp
import numpy as np
import pytest

from grc_jax.core.config import DataConfig
from grc_jax.core.roles import DOC, LATENT, QUERY, TEXT
from grc_jax.data.groups import (
    chain_example,
    chosen,
    doc_hash,
    document_example,
    extra_examples,
    make_group,
    query_example,
    rag_example,
)
from grc_jax.data.layout import gen, latents, layout_example, text
from grc_jax.data.pipeline import train_dataset
from grc_jax.data.schema import GRCRecord
from grc_jax.data.sources import JsonlSource
from grc_jax.model.mask import grc_mask
from tests.data.conftest import tiny_config

# ---------------------------------------------------------------------------------------------
# The query and document examples, with a word-level tokenizer whose ids are known


class WordTok:
    vocab_size = 64
    pad_id, bos_id, eos_id = 0, 2, 3
    WORDS = ["q1", "q2", "r1", "answer", ":", "a1", "d1", "d2", "t1", "n1", "n2",
             "d3", "n3", "t2", *(f"c{i}" for i in range(1, 13))]  # fmt: skip
    IDS = {w: i for i, w in enumerate(WORDS, start=10)}

    def encode(self, s: str) -> list[int]:
        return [self.IDS[w] for w in s.split()]

    def decode(self, ids) -> str:
        return " ".join(self.WORDS[i - 10] for i in ids if i >= 10)


TOK = WordTok()
q1, q2, r1, ANS, COLON, a1, d1, d2, t1, n1, n2 = range(10, 21)
BOS, EOS = 2, 3
RECORD = GRCRecord(
    query="q1 q2", positive="d1 d2", reasoning="r1", answer="a1", negatives=("n1", "n2")
)


def test_query_example_with_reasoning():
    got = query_example(TOK, RECORD, k=3, with_reasoning=True)
    assert [list(b) for b in got] == [
        [text([BOS, q1, q2]), gen([r1, ANS, COLON, a1, EOS]), latents(3)],
        [text([BOS]), gen([q1, q2, EOS])],
    ]


def test_query_example_reasoning_parts():
    no_reasoning = GRCRecord(query="q1", positive="d1", answer="a1")
    assert query_example(TOK, no_reasoning, 2, True)[0][1] == gen([ANS, COLON, a1, EOS])
    no_answer = GRCRecord(query="q1", positive="d1", reasoning="r1")
    assert query_example(TOK, no_answer, 2, True)[0][1] == gen([r1, EOS])
    bare = GRCRecord(query="q1", positive="d1")
    assert list(query_example(TOK, bare, 2, True)[0]) == [text([BOS, q1]), latents(2)]


def test_query_example_without_reasoning():
    got = query_example(TOK, RECORD, k=3, with_reasoning=False)
    assert [list(b) for b in got] == [
        [text([BOS, q1, q2]), latents(3)],
        [text([BOS]), gen([q1, q2, EOS])],
    ]


def test_document_example():
    assert [list(b) for b in document_example(TOK, "d1 d2", None, 2)] == [
        [text([BOS, d1, d2]), latents(2)],
        [text([BOS]), gen([d1, d2, EOS])],
    ]
    assert list(document_example(TOK, "d1 d2", "t1", 2)[1]) == [text([BOS]), gen([t1, EOS])]


def test_make_group():
    record = GRCRecord(**{**RECORD.__dict__, "compress_target": "t1"})
    group = make_group(TOK, record, 2, "independent", with_reasoning=True)
    assert group.kinds == [QUERY, DOC, DOC, DOC]
    assert group.positive == [0, 1, 0, 0]
    assert group.docs == [doc_hash("d1 d2"), doc_hash("d1 d2"), doc_hash("n1"), doc_hash("n2")]
    assert len(set(group.docs[1:])) == 3
    want = [
        query_example(TOK, record, 2, True),
        document_example(TOK, "d1 d2", "t1", 2),
        document_example(TOK, "n1", None, 2),  # negatives reconstruct themselves
        document_example(TOK, "n2", None, 2),
    ]
    assert len(group.examples) == len(want)
    for ex, w in zip(group.examples, want, strict=True):
        expected = layout_example(w, 2, "independent")
        assert set(ex) == set(expected)
        for key in expected:
            np.testing.assert_array_equal(ex[key], expected[key], err_msg=key)
    # The query's reasoning depends on with_reasoning.
    bare = make_group(TOK, record, 2, "independent", with_reasoning=False)
    assert len(bare.examples[0]["tokens"]) == len(group.examples[0]["tokens"]) - 5


ID = TOK.IDS
K = 3
RAG_RECORD = GRCRecord(query="q1 q2", positive="d1 d2 d3", negatives=("n1", "n2", "n3"))


def _ids(s: str) -> list[int]:
    return TOK.encode(s)


# ---------------------------------------------------------------------------------------------
# RAG example


def _doc_of(block) -> str:
    assert len(block) == 2 and block[1] == latents(K)
    assert block[0].role == TEXT and block[0].tokens[0] == BOS
    return TOK.decode(block[0].tokens[1:])


def test_rag_example_blocks_and_target():
    ex = rag_example(TOK, RAG_RECORD, K, memories=3, target_tokens=64, rng=np.random.default_rng(0))
    *memories, consumer = ex
    assert len(memories) == 3
    docs = [_doc_of(b) for b in memories]
    assert "d1 d2 d3" in docs and len(set(docs)) == 3
    assert set(docs) <= {"d1 d2 d3", "n1", "n2", "n3"}
    # The consumer is `generate(query, memories)`: bos + query as text, then the passage.
    assert list(consumer) == [text([BOS, *_ids("q1 q2")]), gen([*_ids("d1 d2 d3"), EOS])]


def test_rag_example_target_and_its_cut():
    rng = np.random.default_rng(0)
    ex = rag_example(TOK, RAG_RECORD, K, 3, target_tokens=2, rng=rng)
    assert ex[-1][1] == gen([*_ids("d1 d2"), EOS])  # the first 2 tokens of the positive
    record = GRCRecord(**{**RAG_RECORD.__dict__, "compress_target": "t1 t2"})
    assert rag_example(TOK, record, K, 3, 64, rng)[-1][1] == gen([*_ids("t1 t2"), EOS])
    assert rag_example(TOK, record, K, 3, 1, rng)[-1][1] == gen([ID["t1"], EOS])


def test_rag_example_with_few_or_no_negatives():
    rng = np.random.default_rng(0)
    one = GRCRecord(query="q1", positive="d1", negatives=("n1",))
    ex = rag_example(TOK, one, K, memories=4, target_tokens=64, rng=rng)
    assert sorted(_doc_of(b) for b in ex[:-1]) == ["d1", "n1"]  # as many as it has
    assert rag_example(TOK, GRCRecord(query="q1", positive="d1"), K, 4, 64, rng) is None


def test_rag_order_and_distractors_are_shuffled_deterministically():
    seen_slots, seen_sets = set(), set()
    for seed in range(40):
        a = rag_example(TOK, RAG_RECORD, K, 3, 64, np.random.default_rng(seed))
        b = rag_example(TOK, RAG_RECORD, K, 3, 64, np.random.default_rng(seed))
        assert a == b
        docs = [_doc_of(blk) for blk in a[:-1]]
        seen_slots.add(docs.index("d1 d2 d3"))
        seen_sets.add(frozenset(docs))
    assert seen_slots == {0, 1, 2}  # the positive is not always in one place
    assert len(seen_sets) == 3  # every choice of 2 of the 3 negatives occurs


def test_rag_positions_memory_m_at_m_times_k():
    ex = rag_example(TOK, RAG_RECORD, K, 3, 64, np.random.default_rng(1))
    laid = layout_example(ex, K, "independent")
    blk, roles, pos = laid["block_ids"], laid["roles"], laid["positions"]
    for m in range(3):
        in_m = blk == m
        np.testing.assert_array_equal(pos[in_m & (roles == LATENT)], np.arange(m * K, (m + 1) * K))
        n_text = int((in_m & (roles == TEXT)).sum())
        np.testing.assert_array_equal(pos[in_m & (roles == TEXT)], np.arange(m * K - n_text, m * K))
    consumer = blk == 3
    assert not (roles[consumer] == LATENT).any()
    np.testing.assert_array_equal(pos[consumer], 3 * K + np.arange(consumer.sum()))


# ---------------------------------------------------------------------------------------------
# Recurrent chain

DOC10 = " ".join(f"c{i}" for i in range(1, 11))


def test_chain_example_blocks():
    ex = chain_example(TOK, DOC10, K, chunk_tokens=4, max_chunks=4)
    c = _ids(DOC10)
    assert (
        [list(b) for b in ex]
        == [
            [text([BOS, *c[0:4]]), latents(K)],  # `compress`: bos + the first chunk
            [text(c[4:8]), latents(K)],  # `update`: the chunk alone, after the old memory
            [text(c[8:10]), latents(K)],
            [text([BOS]), gen([*c[8:10], EOS])],  # `generate` over the last memory
        ]
    )
    short = chain_example(TOK, DOC10, K, chunk_tokens=4, max_chunks=2)
    assert len(short) == 3 and list(short[-1]) == [text([BOS]), gen([*c[4:8], EOS])]
    assert chain_example(TOK, DOC10, K, chunk_tokens=10, max_chunks=4) is None  # one chunk
    assert len(chain_example(TOK, DOC10, K, chunk_tokens=9, max_chunks=4)) == 3


def test_chain_positions_are_those_of_compress_then_update():
    laid = layout_example(chain_example(TOK, DOC10, K, 4, 4), K, "recurrent")
    blk, roles, pos = laid["block_ids"], laid["roles"], laid["positions"]
    np.testing.assert_array_equal(pos, np.arange(len(pos)))  # continuous through the example
    # Engine.update places the old memory at 0..K-1, the chunk at K.. and the new latents right
    # after it; generate over one memory starts its prompt at K. Relative to the previous
    # block's first latent, training puts every block at exactly those distances.
    for b in range(1, 4):
        prev = pos[(blk == b - 1) & (roles == LATENT)]
        np.testing.assert_array_equal(prev - prev[0], np.arange(K))
        here = pos[blk == b] - prev[0]
        np.testing.assert_array_equal(here, K + np.arange(len(here)))


# ---------------------------------------------------------------------------------------------
# Which records get extras


def test_extra_examples_selection():
    data = DataConfig()
    assert extra_examples(TOK, RAG_RECORD, 0, K, data) == []  # fractions 0: nothing
    rag = DataConfig(rag_fraction=1.0)
    got = extra_examples(TOK, RAG_RECORD, 5, K, rag)
    assert len(got) == 1 and len(got[0]) == 4  # 3 memories + consumer
    assert got == extra_examples(TOK, RAG_RECORD, 5, K, rag)  # same index: same example
    orders = {tuple(map(tuple, extra_examples(TOK, RAG_RECORD, i, K, rag)[0])) for i in range(30)}
    assert len(orders) > 1  # another position in the stream: another draw
    bare = GRCRecord(query="q1", positive="d1")
    assert extra_examples(TOK, bare, 5, K, rag) == []  # no negatives: no RAG example
    chain = DataConfig(recurrent_fraction=1.0, chunk_tokens=2)
    assert len(extra_examples(TOK, RAG_RECORD, 5, K, chain)[0]) == 3  # 2 chunks + consumer
    assert extra_examples(TOK, bare, 5, K, chain) == []  # one chunk: no chain


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_chosen_fraction_and_independence(fraction):
    picks = np.array([chosen(fraction, "rag:", 0, i) for i in range(4000)])
    assert abs(picks.mean() - fraction) < 0.03
    other = np.array([chosen(fraction, "chain:", 0, i) for i in range(4000)])
    assert (picks != other).any()
    seed1 = np.array([chosen(fraction, "rag:", 1, i) for i in range(4000)])
    assert (picks != seed1).any()


# ---------------------------------------------------------------------------------------------
# The mask rule on pipeline-built batches


def _mask(batch, mode):
    arrays = (jnp.asarray(a) for a in (batch.segment_ids, batch.block_ids, batch.roles))
    return np.asarray(grc_mask(*arrays, mode))


def _extras(batch):
    """(row, segment id) of the EMPTY-kind slots that hold an example (the extra layouts)."""
    out = []
    for r, s in np.argwhere(batch.seg_kind == 0):
        if (batch.segment_ids[r] == s + 1).any():
            out.append((int(r), int(s) + 1))
    return out


def _batch_with_extras(sp_tok, synth_dir, *overrides):
    ds, _ = train_dataset(tiny_config(*overrides), sp_tok, JsonlSource(synth_dir / "train.jsonl"))
    batch = next(iter(ds))
    assert _extras(batch)
    return batch


def test_rag_consumer_sees_all_memories_and_no_document_text(sp_tok, synth_dir):
    batch = _batch_with_extras(sp_tok, synth_dir, "data.rag_fraction=1")
    k = 8  # tiny.yaml's grc.num_latents
    mask = _mask(batch, "independent")
    for r, seg in _extras(batch):
        idx = np.flatnonzero(batch.segment_ids[r] == seg)
        blk, roles = batch.block_ids[r, idx], batch.roles[r, idx]
        m = int(blk.max())  # memories 0..m-1, consumer m
        assert m == 3 and ((roles == LATENT).sum()) == m * k
        sub = mask[r][np.ix_(idx, idx)]
        causal_block = (blk[:, None] == blk[None, :]) & (idx[None, :] <= idx[:, None])
        for q in range(len(idx)):
            if blk[q] == m:  # consumer: every memory's latents, its own block, nothing else
                want = (roles == LATENT) | causal_block[q]
            else:  # a document: its own block only, its text never its latents
                want = causal_block[q] & ((roles != LATENT) | (roles[q] == LATENT))
            np.testing.assert_array_equal(sub[q], want, err_msg=f"row {r} seg {seg} token {q}")
        # Nothing outside the example.
        assert not mask[r][np.ix_(idx, np.flatnonzero(batch.segment_ids[r] != seg))].any()


def test_chain_recurrent_mask_differs_from_independent_exactly_by_the_running_memory(
    sp_tok, synth_dir
):
    batch = _batch_with_extras(
        sp_tok, synth_dir, "grc.memory_mode=recurrent", "data.recurrent_fraction=1",
        "data.chunk_tokens=4",
    )  # fmt: skip
    rec = _mask(batch, "recurrent")
    ind = _mask(batch, "independent")
    chains = 0
    for r, seg in _extras(batch):
        idx = np.flatnonzero(batch.segment_ids[r] == seg)
        blk, roles = batch.block_ids[r, idx], batch.roles[r, idx]
        last = int(blk.max())  # chunks 0..last-1, consumer `last`
        assert last >= 2
        chains += 1
        is_lat = roles == LATENT
        own = (blk[:, None] == blk[None, :]) & (idx[None, :] <= idx[:, None])
        own &= ~is_lat[None, :] | is_lat[:, None]
        # recurrent: block b reads block b-1's latents (chunks and the consumer alike)
        prev = (blk[None, :] == blk[:, None] - 1) & is_lat[None, :]
        np.testing.assert_array_equal(rec[r][np.ix_(idx, idx)], own | prev)
        # independent: a chunk reads nothing earlier; the consumer every chunk's latents
        consumer = (blk[:, None] == last) & is_lat[None, :]
        np.testing.assert_array_equal(ind[r][np.ix_(idx, idx)], own | consumer)
    # The rest of the batch (2-block query and document examples) is the same in both modes.
    for r in range(batch.segment_ids.shape[0]):
        other = ~np.isin(batch.segment_ids[r], [s for rr, s in _extras(batch) if rr == r])
        np.testing.assert_array_equal(rec[r][np.ix_(other, other)], ind[r][np.ix_(other, other)])
    assert chains
