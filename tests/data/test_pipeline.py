"""The training pipeline: example structure, loss targets, whole-group packing, and the grain
dataset (shapes, positives in-batch, resumable state, per-process shards, bad lines, big groups,
skipped records counted once and again after a resume, data without a usable record)."""

import dataclasses
import hashlib
import json
import zlib

import numpy as np
import pytest

from grc_jax.core.batch import ROW_FIELDS, Batch, Rows
from grc_jax.core.errors import DataError
from grc_jax.core.roles import DOC, GEN, LATENT, PAD, QUERY, TEXT
from grc_jax.data.layout import gen, latents, layout_example, pack_examples, text
from grc_jax.data.pipeline import BatchBuilder, Group, loss_targets, slots_per_row, train_dataset
from grc_jax.data.schema import BadLineError
from grc_jax.data.sources import (
    ArrayRecordSource,
    CountedSource,
    JsonlSource,
    prepare_array_record,
)
from tests.data.conftest import tiny_config, write_jsonl

T, G, L, P = int(TEXT), int(GEN), int(LATENT), int(PAD)

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


def _loss_targets_reference(rows: Rows) -> dict[str, np.ndarray]:
    """`loss_targets` as first written (a Python loop per row and per token), kept as the
    reference for the vectorised one."""
    tokens, seg, blk, roles = rows.tokens, rows.segment_ids, rows.block_ids, rows.roles
    b, t = tokens.shape
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    nxt = np.zeros((b, t), bool)
    nxt[:, :-1] = (
        (roles[:, 1:] == G) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
        & (blk[:, 1:] == blk[:, :-1])
    )  # fmt: skip
    key = seg.astype(np.int64) * 65536 + blk
    consumer = np.zeros((b, t), bool)
    for r in range(b):
        latent_keys = np.unique(key[r][roles[r] == L])
        in_comp = np.isin(key[r], latent_keys)
        first_comp = {}  # segment -> first compression block id
        for k in latent_keys.tolist():
            s_, b_ = divmod(k, 65536)
            first_comp[s_] = min(b_, first_comp.get(s_, b_))
        after = np.array([blk[r, i] > first_comp.get(seg[r, i], 1 << 30) for i in range(t)])
        consumer[r] = ~in_comp & after
    target_consumer = np.zeros((b, t), bool)
    target_consumer[:, :-1] = consumer[:, 1:]
    return {
        "targets": targets,
        "gen_weights": (nxt & ~target_consumer).astype(np.float32),
        "comp_weights": (nxt & target_consumer).astype(np.float32),
    }


def _random_example(rng, k):
    """1-6 blocks, each a compression block (TEXT / GEN spans + K latents) or a consumer block
    (TEXT / GEN spans), in any order: RAG-, chain-, query- and plain-generation-like shapes."""
    blocks = []
    for _ in range(rng.integers(1, 7)):
        spans = [
            (text if rng.random() < 0.5 else gen)(rng.integers(4, 50, size=rng.integers(1, 6)))
            for _ in range(rng.integers(1, 4))
        ]
        blocks.append(spans + [latents(k)] if rng.random() < 0.5 else spans)
    return blocks


def _assert_targets_equal(got, want):
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize("mode", ["independent", "recurrent"])
def test_loss_targets_equals_the_reference_on_random_packed_batches(mode):
    rng = np.random.default_rng(12)
    for _ in range(60):
        k = int(rng.integers(1, 5))
        seq = int(rng.choice([24, 64, 160]))
        examples = [_random_example(rng, k) for _ in range(rng.integers(1, 25))]
        examples = [e for e in examples if len(layout_example(e, k, mode)["tokens"]) <= seq]
        rows = pack_examples(examples, seq, k, mode)
        want = _loss_targets_reference(rows)
        _assert_targets_equal(loss_targets(rows), want)
        # Sparse ids (the same examples and blocks, relabelled in order) take the sorted-key
        # path instead of the table: the same answer.
        if not examples:
            continue
        seg, blk = rows.segment_ids * 1000, rows.block_ids * 1000 + 5
        assert len(seg) * (int(seg.max()) + 1) * (int(blk.max()) + 1) > 4 * seg.size + (1 << 16)
        sparse = dataclasses.replace(rows, segment_ids=seg, block_ids=blk)
        _assert_targets_equal(loss_targets(sparse), want)
    empty = pack_examples([], 8, 2, mode)  # no rows at all
    _assert_targets_equal(loss_targets(empty), _loss_targets_reference(empty))


def test_loss_targets_equals_the_reference_on_pipeline_batches(sp_tok, synth_dir):
    src = JsonlSource(synth_dir / "train.jsonl")
    for overrides in (
        [],
        ["data.rag_fraction=0.5"],
        ["grc.memory_mode=recurrent", "data.recurrent_fraction=0.7", "data.chunk_tokens=3"],
    ):
        it = iter(train_dataset(tiny_config(*overrides), sp_tok, src)[0])
        for _ in range(3):
            batch = next(it)
            want = _loss_targets_reference(batch.rows)
            _assert_targets_equal(loss_targets(batch.rows), want)
            for key in want:  # what the batch carries
                np.testing.assert_array_equal(getattr(batch, key), want[key], err_msg=key)


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


def _check_batch(batch, cfg, process_count=1, extras=False):
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
                if where.size and extras:  # a RAG example or chain: see _check_extras
                    continue
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
        m = (batch.segment_ids[r] == s + 1) & (batch.block_ids[r] == 1) & (batch.roles[r] == G)
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
            np.testing.assert_array_equal(getattr(x, f.name), getattr(y, f.name), err_msg=f.name)


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


def test_each_process_checks_and_reads_only_its_share(sp_tok, big_jsonl, tmp_path):
    """With two processes, `check_all` reads and checks only this process's records (every
    second one), from ArrayRecord shards as from JSONL, and so does the stream: the oversized
    record (index 4, process 0's) stops process 0 only, and process 1 never reads it."""
    path, records = big_jsonl  # 24 records, 4 shards of 6
    prepare_array_record(path, tmp_path / "ar" / "train", num_shards=4)
    pattern = str(tmp_path / "ar" / "train-*.arrayrecord")
    cfg = tiny_config()
    source = CountedSource(ArrayRecordSource(pattern))
    with pytest.raises(DataError, match=r"train-00000-of-00004\.arrayrecord#4: the record's group"):
        train_dataset(cfg, sp_tok, source, process_index=0, process_count=2, check_all=True)
    assert source.records_read == 3  # records 0, 2 and 4, where it stopped
    source = CountedSource(ArrayRecordSource(pattern))
    ds, _ = train_dataset(
        cfg, sp_tok, source, process_index=1, process_count=2, num_epochs=1, check_all=True
    )
    assert source.records_read == 12  # its whole share, checked up front
    queries = [q for batch in ds for q in _query_texts(batch, sp_tok)]
    assert sorted(queries) == sorted(r["query"] for r in records[1::2])
    assert source.records_read == 12  # the stream read the same records, no other


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


# ---------------------------------------------------------------------------------------------
# Extra layouts (RAG examples, recurrent chains) in the batches; defaults unchanged


class HashTok:
    """Word ids from a hash: deterministic everywhere, no tokenizer training."""

    vocab_size = 1024
    pad_id, bos_id, eos_id = 0, 2, 3

    def encode(self, s: str) -> list[int]:
        return [4 + zlib.crc32(w.encode()) % 1020 for w in s.split()]

    def decode(self, ids) -> str:
        return ""


def _digest(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        for f in dataclasses.fields(b):
            a = np.ascontiguousarray(getattr(b, f.name))
            h.update(f"{f.name}{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


# Computed with the code at commit 97b8a64, before the RAG / chain layouts and the vectorised
# loss_targets existed: with their fractions at 0 (the default) the batches, random draws
# included, must stay exactly what they were.
BEFORE_EXTRAS = {
    (): "8e8ed376ff803d42604b1cd08609570e4be6f84da25754afa8fd99f0d21a8867",
    ("grc.memory_mode=recurrent", "data.reasoning_dropout=0.5", "data.shuffle_seed=7"): (
        "4991bf64c1eae9b26a5414078807fddb9c1e35f5e7fa41fdaddf49ffd41dd132"
    ),
}


@pytest.mark.parametrize("overrides", list(BEFORE_EXTRAS), ids=["tiny", "recurrent"])
def test_defaults_give_the_batches_of_before(synth_dir, overrides):
    src = JsonlSource(synth_dir / "train.jsonl")
    it = iter(train_dataset(tiny_config(*overrides), HashTok(), src)[0])
    assert _digest([next(it) for _ in range(5)]) == BEFORE_EXTRAS[overrides]


def _extra_slots(batch):
    return [(int(r), int(s)) for r, s in np.argwhere(batch.seg_kind == 0)
            if (batch.segment_ids[r] == s + 1).any()]  # fmt: skip


def _check_extras(batch, k, last_blocks):
    """Each extra example (EMPTY slot): compression blocks, then one consumer block whose GEN
    targets all count for L_comp; nothing of it for L_gen or InfoNCE. `last_blocks(n)`: whether
    n compression blocks are right. Returns how many there are."""
    queries = set(batch.seg_group[batch.seg_kind == QUERY].tolist())
    for r, s in _extra_slots(batch):
        where = np.flatnonzero(batch.segment_ids[r] == s + 1)
        blk, roles = batch.block_ids[r, where], batch.roles[r, where]
        n = int(blk.max())  # compression blocks 0..n-1, consumer n
        assert last_blocks(n), n
        for b in range(n):
            assert ((blk == b) & (roles == L)).sum() == k
            assert not ((blk == b) & (roles == G)).any()
        consumer = blk == n
        assert not (roles[consumer] == L).any() and roles[consumer][0] == T  # opens with bos
        assert batch.tokens[r, where[consumer][0]] == 2 and batch.tokens[r, where[-1]] == 3
        comp = batch.comp_weights[r, where - 1]  # position i - 1 predicts token i
        np.testing.assert_array_equal(comp, (roles == G).astype(np.float32))
        assert batch.gen_weights[r, where].sum() == 0
        assert batch.seg_positive[r, s] == 0 and batch.seg_doc[r, s] == 0
        assert batch.seg_group[r, s] in queries  # packed with its record's group
    return len(_extra_slots(batch))


def test_rag_examples_in_batches(sp_tok, synth_dir):
    cfg = tiny_config("data.rag_fraction=1")
    it = iter(train_dataset(cfg, sp_tok, JsonlSource(synth_dir / "train.jsonl"))[0])
    for _ in range(3):
        batch = next(it)
        _check_batch(batch, cfg, extras=True)
        n = _check_extras(batch, cfg.grc.num_latents, lambda n: n == 3)  # 1 + 2 negatives
        assert n == (batch.seg_kind == QUERY).sum()  # every record has negatives: one each


def test_recurrent_chains_in_batches(sp_tok, synth_dir):
    cfg = tiny_config(
        "grc.memory_mode=recurrent", "data.recurrent_fraction=0.5", "data.chunk_tokens=4",
        "data.max_chunks=3",
    )  # fmt: skip
    it = iter(train_dataset(cfg, sp_tok, JsonlSource(synth_dir / "train.jsonl"))[0])
    total = queries = 0
    for _ in range(4):
        batch = next(it)
        _check_batch(batch, cfg, extras=True)
        total += _check_extras(batch, cfg.grc.num_latents, lambda n: 2 <= n <= 3)
        queries += (batch.seg_kind == QUERY).sum()
    assert 0.25 * queries < total < 0.75 * queries


def test_extra_layouts_resume_identically(sp_tok, synth_dir):
    cfg = tiny_config("data.rag_fraction=0.5")
    ds, _ = train_dataset(cfg, sp_tok, JsonlSource(synth_dir / "train.jsonl"))
    it = iter(ds)
    _batches(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    expected = _batches(it, 3)
    assert any(_extra_slots(b) for b in expected)
    it2 = iter(train_dataset(cfg, sp_tok, JsonlSource(synth_dir / "train.jsonl"))[0])
    it2.set_state(state)
    _assert_batches_equal(_batches(it2, 3), expected)


def test_an_extra_that_does_not_fit_is_left_out(sp_tok, synth_dir):
    # At 72 tokens a row holds every query and document example of the synthetic data (at most
    # 65 tokens) but no RAG example (3 documents + the query and its passage: at least 76), so
    # the records train without one.
    src = JsonlSource(synth_dir / "train.jsonl")
    plain = iter(train_dataset(tiny_config("data.seq_len=72"), sp_tok, src)[0])
    rag = iter(train_dataset(tiny_config("data.seq_len=72", "data.rag_fraction=1"), sp_tok, src)[0])
    _assert_batches_equal(_batches(rag, 3), _batches(plain, 3))


def test_oversized_record_is_named_with_extras_on(sp_tok, big_jsonl):
    path, _ = big_jsonl
    cfg = tiny_config("data.rag_fraction=1")
    ds, _ = train_dataset(cfg, sp_tok, JsonlSource(path), num_epochs=1)
    with pytest.raises(DataError, match=rf"^{path}:5: the record's group of 4 examples \("):
        for _ in ds:
            pass
