"""The training pipeline: example structure, loss targets, whole-group packing, and the grain
dataset (shapes, positives in-batch, resumable state, per-process shards, bad lines, big groups,
skipped records counted once and again after a resume, data without a usable record)."""

import dataclasses
import json

import numpy as np
import pytest

from grc_jax.core.batch import ROW_FIELDS, Batch, Rows
from grc_jax.core.errors import DataError
from grc_jax.core.roles import GEN, LATENT, PAD, TEXT
from grc_jax.data.layout import gen, latents, layout_example, text
from grc_jax.data.pipeline import (
    DOC,
    QUERY,
    BatchBuilder,
    Group,
    doc_hash,
    document_example,
    loss_targets,
    make_group,
    query_example,
    slots_per_row,
    train_dataset,
)
from grc_jax.data.schema import BadLineError, GRCRecord
from grc_jax.data.sources import JsonlSource
from tests.data.conftest import tiny_config, write_jsonl

T, G, L, P = int(TEXT), int(GEN), int(LATENT), int(PAD)

# ---------------------------------------------------------------------------------------------
# Example structure, with a word-level tokenizer whose ids are known


class WordTok:
    vocab_size = 32
    pad_id, bos_id, eos_id = 0, 2, 3
    WORDS = ["q1", "q2", "r1", "answer", ":", "a1", "d1", "d2", "t1", "n1", "n2"]
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


# ---------------------------------------------------------------------------------------------
# loss_targets on a hand-built packed batch


def _rows(*rows):
    """Rows given as lists of (token, segment, block, role) -> `[B, T]` int32 arrays."""
    t = max(len(r) for r in rows)
    out = {k: np.zeros((len(rows), t), np.int32) for k in ROW_FIELDS}
    for b, row in enumerate(rows):
        for i, (tok, seg, blk, role) in enumerate(row):
            out["tokens"][b, i], out["segment_ids"][b, i] = tok, seg
            out["block_ids"][b, i], out["roles"][b, i] = blk, role
    return Rows(**out)


def test_loss_targets_hand_built():
    row0 = [
        # segment 1, a query: block 0 = TEXT TEXT GEN GEN LAT LAT, block 1 = TEXT(bos) GEN GEN
        (5, 1, 0, T), (6, 1, 0, T), (7, 1, 0, G), (8, 1, 0, G), (0, 1, 0, L), (1, 1, 0, L),
        (2, 1, 1, T), (9, 1, 1, G), (3, 1, 1, G),
        # segment 2: block 0 = TEXT TEXT LAT LAT, block 1 = GEN GEN (no bos: starts at a boundary)
        (2, 2, 0, T), (4, 2, 0, T), (0, 2, 0, L), (1, 2, 0, L), (11, 2, 1, G), (3, 2, 1, G),
        # segment 3: a single block of GEN only, no latents anywhere (starts right after seg 2)
        (12, 3, 0, G), (13, 3, 0, G),
        (0, 0, 0, P),
    ]  # fmt: skip
    row1 = [
        (5, 1, 0, T), (6, 1, 0, G), (0, 1, 0, L),  # segment 1, block 0: compression
        (7, 2, 0, T), (8, 2, 0, G), (9, 2, 0, G),  # segment 2, block 0: plain generation
        (4, 3, 0, T), (10, 3, 0, G), (0, 3, 0, L),  # segment 3, block 0: compression here
    ] + [(0, 0, 0, P)] * 9  # fmt: skip
    row2 = [(0, 0, 0, P)] * 18
    rows = _rows(row0, row1, row2)
    got = loss_targets(rows)
    assert set(got) == {"targets", "gen_weights", "comp_weights"}

    want_targets = np.zeros((3, 18), np.int32)
    want_targets[0, :17] = [r[0] for r in row0[1:]]
    want_targets[1, :17] = [r[0] for r in row1[1:]]
    np.testing.assert_array_equal(got["targets"], want_targets)
    assert got["targets"].dtype == np.int32

    want_gen = np.zeros((3, 18), np.float32)
    want_comp = np.zeros((3, 18), np.float32)
    # row 0: positions 1, 2 predict the compression block's GEN 7, 8 (from TEXT 6 and GEN 7);
    # 6, 7 predict consumer GEN 9, 3 of segment 1; 13 predicts GEN 3 of segment 2 (12 -> 13 crosses
    # blocks); 15 predicts GEN 13 of segment 3, a plain generation example with no compression
    # block to read, so L_gen (14 -> 15 crosses segments); 16 -> padding.
    want_gen[0, [1, 2, 15]] = 1
    want_comp[0, [6, 7, 13]] = 1
    # row 1: same block id 0 in every segment; segments 1 and 3 hold latents, segment 2 is plain
    # generation (no earlier compression block): all three count for L_gen, none for L_comp.
    want_gen[1, [0, 3, 4, 6]] = 1
    for key, want in (("gen_weights", want_gen), ("comp_weights", want_comp)):
        assert got[key].dtype == np.float32, key
        np.testing.assert_array_equal(got[key], want, err_msg=key)


# ---------------------------------------------------------------------------------------------
# BatchBuilder


K = 2


def _group(lengths, tag=1):
    """One query and its documents; example i has `lengths[i]` tokens (TEXT, then K latents)."""
    examples = [
        layout_example([[text([tag] * (n - K)), latents(K)]], K, "independent") for n in lengths
    ]
    kinds = [QUERY] + [DOC] * (len(lengths) - 1)
    positive = [0, 1] + [0] * (len(lengths) - 2)
    docs = [100 + tag] * 2 + [200 + tag + i for i in range(len(lengths) - 2)]
    return Group(
        examples=examples, kinds=kinds, positive=positive[: len(lengths)], docs=docs[: len(lengths)]
    )


def _snapshot(builder):
    return (
        {k: v.copy() for k, v in builder.arrays.items()},
        {k: v.copy() for k, v in builder.meta.items()},
        list(builder.fill),
        list(builder.used),
        builder.groups,
    )


def _assert_same(a, b):
    for x, y in zip(a[:2], b[:2], strict=True):
        assert set(x) == set(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)
    assert a[2:] == b[2:]


def test_batch_builder_places_groups_whole():
    builder = BatchBuilder(rows=2, seq_len=10, slots=3, group_id_stride=2, group_id_offset=1)
    assert builder.try_add(_group([6, 4], tag=5))  # row 0: 6 + 4
    assert builder.try_add(_group([5, 5], tag=6))  # row 1: 5 + 5
    before = _snapshot(builder)
    assert not builder.try_add(_group([3], tag=7))  # no room anywhere
    _assert_same(_snapshot(builder), before)
    batch = builder.finish()

    np.testing.assert_array_equal(batch.segment_ids, [[1] * 6 + [2] * 4, [1] * 5 + [2] * 5])
    np.testing.assert_array_equal(batch.tokens[0, :4], [5] * 4)
    np.testing.assert_array_equal(batch.tokens[1, :3], [6] * 3)
    np.testing.assert_array_equal(batch.seg_kind, [[QUERY, DOC, 0], [QUERY, DOC, 0]])
    np.testing.assert_array_equal(batch.seg_positive, [[0, 1, 0], [0, 1, 0]])
    np.testing.assert_array_equal(batch.seg_group, [[1, 1, 0], [3, 3, 0]])  # index * 2 + 1
    np.testing.assert_array_equal(batch.seg_doc, [[105, 105, 0], [106, 106, 0]])
    targets = loss_targets(batch.rows)
    for key in targets:
        np.testing.assert_array_equal(getattr(batch, key), targets[key], err_msg=key)
    # finish() starts an empty batch whose group ids restart at the offset.
    assert builder.groups == 0 and not builder.arrays["segment_ids"].any()
    assert builder.try_add(_group([3], tag=7))
    assert builder.finish().seg_group[0, 0] == 1


def test_batch_builder_partial_fit_places_nothing():
    builder = BatchBuilder(rows=2, seq_len=10, slots=4, group_id_stride=1, group_id_offset=0)
    assert builder.try_add(_group([7]))
    before = _snapshot(builder)
    # The first two examples would fit in row 1, the third nowhere: nothing of the group is placed.
    assert not builder.try_add(_group([5, 5, 5], tag=2))
    _assert_same(_snapshot(builder), before)
    assert builder.try_add(_group([3, 5, 5], tag=3))  # 3 after the 7 in row 0, 5 + 5 in row 1
    batch = builder.finish()
    np.testing.assert_array_equal(batch.segment_ids, [[1] * 7 + [2] * 3, [1] * 5 + [2] * 5])
    np.testing.assert_array_equal(batch.seg_group, [[0, 1, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(batch.seg_kind, [[QUERY, QUERY, 0, 0], [DOC, DOC, 0, 0]])
    np.testing.assert_array_equal(batch.seg_positive, [[0, 0, 0, 0], [1, 0, 0, 0]])


def test_batch_builder_slot_limit():
    builder = BatchBuilder(rows=1, seq_len=100, slots=2, group_id_stride=1, group_id_offset=0)
    assert builder.try_add(_group([3, 3]))
    assert not builder.try_add(_group([3]))  # tokens to spare, but no slot
    assert builder.used == [2] and builder.fill == [6]


# ---------------------------------------------------------------------------------------------
# train_dataset on the synthetic corpus


def _check_batch(batch, cfg, process_count=1):
    rows, seq = cfg.data.batch_size // process_count, cfg.data.seq_len
    slots = slots_per_row(cfg)
    k = cfg.grc.num_latents
    int_keys = [*ROW_FIELDS, "targets", "seg_kind", "seg_group", "seg_positive", "seg_doc"]
    assert isinstance(batch, Batch)
    assert {f.name for f in dataclasses.fields(batch)} == {*int_keys, "gen_weights", "comp_weights"}
    for key in int_keys:
        assert getattr(batch, key).dtype == np.int32, key
    for key in ("gen_weights", "comp_weights"):
        assert getattr(batch, key).dtype == np.float32, key
    for key in (*ROW_FIELDS, "targets", "gen_weights", "comp_weights"):
        assert getattr(batch, key).shape == (rows, seq), key
    for key in ("seg_kind", "seg_group", "seg_positive", "seg_doc"):
        assert getattr(batch, key).shape == (rows, slots), key

    seg, roles, blk = batch.segment_ids, batch.roles, batch.block_ids
    assert ((seg == 0) == (roles == P)).all()
    for r in range(rows):
        for s in range(slots):
            where = np.flatnonzero(seg[r] == s + 1)
            if batch.seg_kind[r, s] == 0:
                assert where.size == 0 and batch.seg_group[r, s] == 0
                continue
            assert where.size > 0, (r, s)
            assert (np.diff(where) == 1).all(), "an example must be contiguous"
            # Every example: a compression block 0 ending in K latents, then a consumer block 1.
            assert ((roles[r, where] == L) & (blk[r, where] == 0)).sum() == k
            assert ((roles[r, where] == L) & (blk[r, where] != 0)).sum() == 0
            assert ((roles[r, where] == G) & (blk[r, where] == 1)).sum() >= 2

    # Each query's positive is in the batch: same group, seg_positive = 1, same doc hash.
    kind, group = batch.seg_kind, batch.seg_group
    queries = np.argwhere(kind == QUERY)
    assert len(queries) > 0
    for r, s in queries:
        g = group[r, s]
        assert batch.seg_positive[r, s] == 0
        pos = (kind == DOC) & (group == g) & (batch.seg_positive == 1)
        assert pos.sum() == 1, f"query of group {g} has {pos.sum()} positives in its batch"
        assert batch.seg_doc[pos][0] == batch.seg_doc[r, s]
        assert ((kind == DOC) & (group == g)).sum() == 3  # positive + 2 hard negatives
    ids = group[kind == QUERY]
    assert len(set(ids.tolist())) == len(ids), "group ids must be unique in a batch"
    assert not ((kind == DOC) & ~np.isin(group, ids)).any(), "a document without its query"


def _query_texts(batch, tok):
    """Queries of a batch in group-id (i.e. consumption) order, decoded from their block 1."""
    out = []
    for r, s in sorted(
        np.argwhere(batch.seg_kind == QUERY), key=lambda rs: batch.seg_group[tuple(rs)]
    ):
        m = (
            (batch.segment_ids[r] == s + 1)
            & (batch.block_ids[r] == 1)
            & (batch.roles[r] == G)
        )
        ids = batch.tokens[r][m].tolist()
        assert ids[-1] == tok.eos_id
        out.append(tok.decode(ids[:-1]))
    return out


def test_train_batches_shapes_and_positives(sp_tok, synth_dir):
    cfg = tiny_config()
    ds, parser = train_dataset(cfg, sp_tok, JsonlSource(synth_dir / "train.jsonl"))
    it = iter(ds)
    for _ in range(6):
        batch = next(it)
        _check_batch(batch, cfg)
        assert batch.comp_weights.sum() > 0 and batch.gen_weights.sum() > 0
        assert set(np.unique(batch.seg_group[batch.seg_kind == QUERY])) == set(
            range((batch.seg_kind == QUERY).sum())
        )  # index * 1 + 0 in a single process
    assert parser.bad_lines == 0


def test_reasoning_dropout_extremes(sp_tok, synth_dir):
    src = JsonlSource(synth_dir / "train.jsonl")
    for dropout, has_reasoning in ((0.0, True), (1.0, False)):
        ds, _ = train_dataset(tiny_config(f"data.reasoning_dropout={dropout}"), sp_tok, src)
        batch = next(iter(ds))
        queries = np.argwhere(batch.seg_kind == QUERY)
        for r, s in queries:
            m = (batch.segment_ids[r] == s + 1) & (batch.block_ids[r] == 0)
            assert (batch.roles[r][m] == G).any() == has_reasoning
        # L_gen only has reasoning targets.
        assert (batch.gen_weights.sum() > 0) == has_reasoning


def test_every_epoch_is_a_permutation(sp_tok, unique_records, tmp_path):
    records = unique_records[:24]
    path = write_jsonl(tmp_path / "small.jsonl", records)
    ds, _ = train_dataset(tiny_config(), sp_tok, JsonlSource(path))
    it = iter(ds)
    seen: list[str] = []
    while len(seen) < 3 * len(records):
        seen += _query_texts(next(it), sp_tok)
    n = len(records)
    epochs = [seen[i * n : (i + 1) * n] for i in range(3)]
    for e in epochs:
        assert sorted(e) == sorted(r["query"] for r in records)
    assert epochs[0] != epochs[1] != epochs[2], "each epoch should have a new order"


def _batches(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert type(x) is type(y) is Batch
        for f in dataclasses.fields(x):
            np.testing.assert_array_equal(
                getattr(x, f.name), getattr(y, f.name), err_msg=f.name
            )


def test_state_resumes_identically(sp_tok, synth_dir):
    cfg = tiny_config()
    source = JsonlSource(synth_dir / "train.jsonl")
    ds, _ = train_dataset(cfg, sp_tok, source)
    it = iter(ds)
    first = _batches(it, 3)
    state = it.get_state()
    saved = json.loads(json.dumps(state))  # a checkpoint stores it as JSON
    expected = _batches(it, 4)

    it.set_state(state)
    _assert_batches_equal(_batches(it, 4), expected)

    # A new process: a freshly built dataset and iterator restored from the saved state.
    ds2, _ = train_dataset(cfg, sp_tok, JsonlSource(synth_dir / "train.jsonl"))
    it2 = iter(ds2)
    it2.set_state(saved)
    _assert_batches_equal(_batches(it2, 4), expected)

    # Restoring the start state replays from the beginning.
    it3 = iter(train_dataset(cfg, sp_tok, source)[0])
    start = it3.get_state()
    _assert_batches_equal(_batches(it3, 3), first)
    it3.set_state(start)
    _assert_batches_equal(_batches(it3, 3), first)


def test_processes_see_disjoint_records(sp_tok, unique_records, tmp_path):
    records = unique_records[:40]
    path = write_jsonl(tmp_path / "shared.jsonl", records)
    cfg = tiny_config()  # global batch 4 rows: 2 per process
    seen = {}
    for p in range(2):
        ds, _ = train_dataset(
            cfg, sp_tok, JsonlSource(path), process_index=p, process_count=2, num_epochs=1
        )
        queries, groups = [], []
        for batch in ds:
            _check_batch(batch, cfg, process_count=2)  # 2 local rows each
            queries += _query_texts(batch, sp_tok)
            groups += batch.seg_group[batch.seg_kind > 0].tolist()
            ids = sorted(batch.seg_group[batch.seg_kind == QUERY].tolist())
            assert ids == [i * 2 + p for i in range(len(ids))]  # index * stride + offset
        assert queries and len(set(queries)) == len(queries)
        assert set(queries) <= {r["query"] for r in records[p::2]}, (
            f"process {p} read another's records"
        )
        assert all(g % 2 == p for g in groups), f"process {p}: group ids must be {p} mod 2"
        seen[p] = queries
    assert not set(seen[0]) & set(seen[1])
    with pytest.raises(ValueError, match="not divisible"):
        train_dataset(cfg, sp_tok, JsonlSource(path), process_index=0, process_count=3)


@pytest.fixture
def bad_jsonl(unique_records, tmp_path):
    lines = [json.dumps(r) for r in unique_records[:30]]
    lines.insert(7, '{"query": "q", "positive": "p", "typo_field": 1}')  # line 8
    lines.insert(20, "{not json")  # line 21
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_skip_bad_lines_counts_them(sp_tok, bad_jsonl, unique_records):
    ds, parser = train_dataset(
        tiny_config("data.skip_bad_lines=true"), sp_tok, JsonlSource(bad_jsonl), num_epochs=1
    )
    queries = [q for batch in ds for q in _query_texts(batch, sp_tok)]
    assert parser.bad_lines == 2
    assert queries and set(queries) <= {r["query"] for r in unique_records[:30]}


def test_skipped_lines_are_counted_once_and_listed(sp_tok, bad_jsonl, unique_records):
    ds, parser = train_dataset(
        tiny_config("data.skip_bad_lines=true"), sp_tok, JsonlSource(bad_jsonl)
    )
    it = iter(ds)
    seen: list[str] = []
    while len(seen) < 3 * 30:  # three epochs: the same two lines are skipped in each
        seen += _query_texts(next(it), sp_tok)
    assert parser.bad_lines == 2
    assert sorted(parser.first_skipped) == [
        f"{bad_jsonl}:21: not valid JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1))",
        f"{bad_jsonl}:8: unknown field(s) ['typo_field']; expected fields: ['query', "
        "'positive', 'reasoning', 'answer', 'negatives', 'compress_target']",
    ]
    assert it.get_state()["parent"]["bad_lines"] == 2  # checkpointed with the data position


def test_bad_line_error_names_file_and_line(sp_tok, bad_jsonl):
    ds, _ = train_dataset(tiny_config(), sp_tok, JsonlSource(bad_jsonl), num_epochs=1)
    with pytest.raises(BadLineError, match=rf"^{bad_jsonl}:(8|21): "):
        for _ in ds:
            pass


def test_group_too_large_for_a_batch(sp_tok, synth_dir):
    cfg = tiny_config("data.seq_len=24")
    ds, _ = train_dataset(cfg, sp_tok, JsonlSource(synth_dir / "train.jsonl"))
    with pytest.raises(ValueError, match="does not fit in one batch of 4 rows x 24 tokens"):
        next(iter(ds))


def test_finite_epochs_keep_the_last_partial_batch(tmp_path, sp_tok):
    """With num_epochs set, the groups placed before the data ran out still form a batch."""

    lines = [
        {"query": f"q {i}", "positive": f"doc {i}", "reasoning": "1 + 1 = 2", "answer": "2"}
        for i in range(3)
    ]
    path = tmp_path / "three.jsonl"
    write_jsonl(path, lines)
    ds, _ = train_dataset(tiny_config(), sp_tok, JsonlSource(path), num_epochs=1)
    batches = list(ds)
    assert len(batches) == 1
    assert int((batches[0].seg_kind == 1).sum()) == 3


# ---------------------------------------------------------------------------------------------
# Data without a usable record stops at once; records too large for a batch are named and skipped


def test_all_bad_lines_stop_after_one_pass_instead_of_spinning(sp_tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{nope\n" * 7 + '{"query": "q"}\n')
    cfg = tiny_config("data.skip_bad_lines=true")
    ds, parser = train_dataset(cfg, sp_tok, JsonlSource(path))  # repeats forever
    with pytest.raises(DataError) as e:
        next(iter(ds))
    assert str(e.value).startswith(
        f"{path}: no usable record (8 lines, all skipped as bad; first: {path}:"
    )
    assert parser.bad_lines == 8  # one pass
    # Restored mid-epoch (a checkpoint's position): still stopped, within two passes.
    ds, parser = train_dataset(cfg, sp_tok, JsonlSource(path))
    it = iter(ds)
    it.set_state({"parent": {"parent": {"next_index": 3}, "bad_lines": 3}})
    with pytest.raises(DataError, match=r"no usable record \(8 lines, all skipped as bad"):
        next(it)
    assert parser.bad_lines == 8


def test_empty_data_is_refused_before_iterating(sp_tok, tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=rf"^{path}: no usable record \(2 lines, all blank\)$"):
        train_dataset(tiny_config(), sp_tok, JsonlSource(path))
    one = write_jsonl(tmp_path / "one.jsonl", [{"query": "q", "positive": "p"}])
    with pytest.raises(DataError, match=r"no record for process 1 of 2: 1 records shared"):
        train_dataset(tiny_config(), sp_tok, JsonlSource(one), process_index=1, process_count=2)


@pytest.fixture
def big_jsonl(unique_records, tmp_path):
    """24 records; line 5's positive is too long for a 256-token row."""
    records = [dict(r) for r in unique_records[:24]]
    records[4]["positive"] = " ".join(["velora is a city ."] * 80)
    return write_jsonl(tmp_path / "big.jsonl", records), records


def test_oversized_record_is_named_by_file_and_line(sp_tok, big_jsonl):
    path, _ = big_jsonl
    ds, _ = train_dataset(tiny_config(), sp_tok, JsonlSource(path), num_epochs=1)
    with pytest.raises(DataError) as e:
        for _ in ds:
            pass
    assert not isinstance(e.value, BadLineError)
    msg = str(e.value)
    assert msg.startswith(f"{path}:5: the record's group of 4 examples (")
    assert "does not fit in one batch of 4 rows x 256 tokens (at most" in msg
    assert "data.skip_bad_lines=true" in msg


def test_check_all_refuses_bad_records_up_front(sp_tok, big_jsonl, tmp_path):
    """`check_all` (what `grc train` uses) stops at construction, before any batch is read."""
    path, records = big_jsonl
    with pytest.raises(DataError, match=rf"^{path}:5: the record's group of 4 examples \("):
        train_dataset(tiny_config(), sp_tok, JsonlSource(path), check_all=True)
    bad = tmp_path / "bad_last.jsonl"
    bad.write_text(path.read_text().replace(records[4]["positive"], "x") + "{]\n")
    with pytest.raises(BadLineError, match=rf"^{bad}:25: not valid JSON"):
        train_dataset(tiny_config(), sp_tok, JsonlSource(bad), check_all=True)
    # With skipping on nothing is read up front: the records are skipped and counted later.
    ds, parser = train_dataset(
        tiny_config("data.skip_bad_lines=true"), sp_tok, JsonlSource(path), check_all=True
    )
    assert parser.bad_lines == 0


def test_oversized_record_is_skipped_and_again_after_a_restore(sp_tok, big_jsonl):
    path, records = big_jsonl
    cfg = tiny_config("data.skip_bad_lines=true")
    ds, parser = train_dataset(cfg, sp_tok, JsonlSource(path))
    it = iter(ds)
    seen: list[str] = []
    while len(seen) < 12:
        seen += _query_texts(next(it), sp_tok)
    state = json.loads(json.dumps(it.get_state()))
    count = parser.bad_lines
    expected = _batches(it, 8)  # past the end of the first epoch
    assert parser.bad_lines == 1
    assert parser.first_skipped[0].startswith(f"{path}:5: the record's group of 4 examples")
    queries = [q for b in expected for q in _query_texts(b, sp_tok)]
    assert records[4]["query"] not in queries + seen
    # A resumed iterator skips the same record again and continues the saved count.
    ds2, parser2 = train_dataset(cfg, sp_tok, JsonlSource(path))
    it2 = iter(ds2)
    it2.set_state(state)
    assert parser2.bad_lines == count
    _assert_batches_equal(_batches(it2, 8), expected)
    assert parser2.bad_lines == 1


def test_a_checkpoint_without_the_count_still_restores(sp_tok, synth_dir):
    cfg = tiny_config()
    ds, _ = train_dataset(cfg, sp_tok, JsonlSource(synth_dir / "train.jsonl"))
    it = iter(ds)
    _batches(it, 2)
    state = it.get_state()
    expected = _batches(it, 2)
    old = {"parent": state["parent"]["parent"]}  # as saved before the count was kept
    it2 = iter(train_dataset(cfg, sp_tok, JsonlSource(synth_dir / "train.jsonl"))[0])
    it2.set_state(old)
    _assert_batches_equal(_batches(it2, 2), expected)
