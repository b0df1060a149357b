"""Layout and packing of examples into rows (DESIGN.md 1-3), with hand-computed expectations."""

import numpy as np
import pytest

from grc_jax.core.batch import ROW_FIELDS, Rows
from grc_jax.core.roles import GEN, LATENT, PAD, TEXT
from grc_jax.data.layout import (
    LayoutError,
    RowPacker,
    Span,
    gen,
    latents,
    layout_example,
    pack_examples,
    text,
)

T, G, L, P = int(TEXT), int(GEN), int(LATENT), int(PAD)


def _assert_layout(got, **expected):
    assert set(got) == {"tokens", "block_ids", "roles", "positions"}
    for key, want in expected.items():
        assert got[key].dtype == np.int32, key
        np.testing.assert_array_equal(got[key], np.asarray(want), err_msg=key)


# ---------------------------------------------------------------------------------------------
# Spans


def test_span_constructors():
    assert latents(3) == Span(LATENT, (0, 1, 2))
    assert text([4, 5]) == Span(TEXT, (4, 5))
    # numpy ids become a hashable tuple of plain ints.
    span = gen(np.array([6, 7]))
    assert span == Span(GEN, (6, 7)) and all(type(t) is int for t in span.tokens)
    hash(span)


# ---------------------------------------------------------------------------------------------
# One example: K=2, query block [TEXT 3][GEN 2][LATENT 2] + consumer block [GEN 3].

QUERY = [
    [text([11, 12, 13]), gen([14, 15]), latents(2)],
    [gen([16, 17, 18])],
]


def test_query_example_independent():
    _assert_layout(
        layout_example(QUERY, 2, "independent"),
        tokens=[11, 12, 13, 14, 15, 0, 1, 16, 17, 18],
        block_ids=[0, 0, 0, 0, 0, 0, 0, 1, 1, 1],
        roles=[T, T, T, G, G, L, L, G, G, G],
        # Block 0's latents sit canonically at 0..K-1, its text just before; the consumer at M*K=2.
        positions=[-5, -4, -3, -2, -1, 0, 1, 2, 3, 4],
    )


def test_query_example_recurrent():
    _assert_layout(
        layout_example(QUERY, 2, "recurrent"),
        tokens=[11, 12, 13, 14, 15, 0, 1, 16, 17, 18],
        block_ids=[0, 0, 0, 0, 0, 0, 0, 1, 1, 1],
        roles=[T, T, T, G, G, L, L, G, G, G],
        positions=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    )


# RAG: three documents compressed one by one (K=2), then a question reading all three memories.
RAG = [
    [text([21, 22, 23]), latents(2)],
    [text([31, 32]), latents(2)],
    [text([41, 42, 43, 44]), latents(2)],
    [text([51, 52]), gen([53, 54])],
]
RAG_TOKENS = [21, 22, 23, 0, 1, 31, 32, 0, 1, 41, 42, 43, 44, 0, 1, 51, 52, 53, 54]
RAG_BLOCKS = [0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3]
RAG_ROLES = [T, T, T, L, L, T, T, L, L, T, T, T, T, L, L, T, T, G, G]


def test_rag_example_independent():
    _assert_layout(
        layout_example(RAG, 2, "independent"),
        tokens=RAG_TOKENS,
        block_ids=RAG_BLOCKS,
        roles=RAG_ROLES,
        positions=[
            -3, -2, -1, 0, 1,  # doc 0 (m=0): latents at [0, 2)
            0, 1, 2, 3,  # doc 1 (m=1): latents at [2, 4), its 2 text tokens at 0, 1
            0, 1, 2, 3, 4, 5,  # doc 2 (m=2): latents at [4, 6), its 4 text tokens at 0..3
            6, 7, 8, 9,  # question: M*K = 3*2
        ],
    )  # fmt: skip


def test_rag_example_recurrent():
    _assert_layout(
        layout_example(RAG, 2, "recurrent"),
        tokens=RAG_TOKENS,
        block_ids=RAG_BLOCKS,
        roles=RAG_ROLES,
        positions=list(range(19)),
    )


def test_independent_consumers_between_compression_blocks():
    # K=1. A consumer block counts only the compression blocks before it.
    example = [
        [text([1]), latents(1)],
        [gen([2, 2])],
        [text([3]), latents(1)],
        [gen([4])],
    ]
    _assert_layout(
        layout_example(example, 1, "independent"),
        tokens=[1, 0, 2, 2, 3, 0, 4],
        block_ids=[0, 0, 1, 1, 2, 2, 3],
        roles=[T, L, G, G, T, L, G],
        positions=[-1, 0, 1, 2, 0, 1, 2],
    )
    _assert_layout(layout_example(example, 1, "recurrent"), positions=[0, 1, 2, 3, 4, 5, 6])


def test_consumer_only_and_latent_only_blocks():
    # A plain consumer example (no memory) starts at 0 in both modes.
    for mode in ("independent", "recurrent"):
        _assert_layout(
            layout_example([[text([7, 8]), gen([9])]], 4, mode),
            tokens=[7, 8, 9],
            block_ids=[0, 0, 0],
            roles=[T, T, G],
            positions=[0, 1, 2],
        )
    # A block of latents alone is a compression block with n_m = 0.
    _assert_layout(
        layout_example([[latents(2)], [gen([5])]], 2, "independent"),
        roles=[L, L, G],
        positions=[0, 1, 2],
    )


# ---------------------------------------------------------------------------------------------
# Packing


def test_pack_rows_segments_and_padding():
    k = 1
    ex_a = [[text([1, 2]), latents(1)], [gen([3])]]  # 4 tokens
    ex_b = [[gen([4, 5])]]  # 2 tokens
    ex_c = [[text([6]), latents(1)], [gen([7, 8, 9])]]  # 5 tokens
    ex_d = [[text([10])]]  # 1 token
    # seq_len 7: a+b fill 6 (c does not fit -> new row), c+d fill 6.
    rows = pack_examples([ex_a, ex_b, ex_c, ex_d], 7, k, "independent")
    assert isinstance(rows, Rows)
    for key in ROW_FIELDS:
        v = getattr(rows, key)
        assert v.dtype == np.int32 and v.shape == (2, 7), key
    np.testing.assert_array_equal(rows.tokens, [[1, 2, 0, 3, 4, 5, 0], [6, 0, 7, 8, 9, 10, 0]])
    np.testing.assert_array_equal(
        rows.segment_ids, [[1, 1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 2, 0]]
    )
    np.testing.assert_array_equal(rows.block_ids, [[0, 0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(rows.roles, [[T, T, L, G, G, G, P], [T, L, G, G, G, T, P]])
    np.testing.assert_array_equal(
        rows.positions, [[-2, -1, 0, 1, 0, 1, 0], [-1, 0, 1, 2, 3, 0, 0]]
    )


def test_pack_is_greedy_in_order_and_never_splits():
    # Lengths 5, 4, 2, 3 into rows of 8: [5] [4, 2] [3]. The 2-token example would fit after the
    # first one, but packing never goes back to an earlier row.
    examples = [[[gen([i] * n)]] for i, n in zip((1, 2, 3, 4), (5, 4, 2, 3), strict=True)]
    rows = pack_examples(examples, 8, 2, "recurrent")
    np.testing.assert_array_equal(
        rows.tokens,
        [[1, 1, 1, 1, 1, 0, 0, 0], [2, 2, 2, 2, 3, 3, 0, 0], [4, 4, 4, 0, 0, 0, 0, 0]],
    )
    np.testing.assert_array_equal(
        rows.segment_ids,
        [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]],
    )


def test_pack_exact_fit_and_empty_input():
    rows = pack_examples([[[gen([1, 2, 3])]], [[gen([4])]]], 3, 2, "independent")
    np.testing.assert_array_equal(rows.tokens, [[1, 2, 3], [4, 0, 0]])
    np.testing.assert_array_equal(rows.segment_ids, [[1, 1, 1], [1, 0, 0]])
    empty = pack_examples([], 5, 2, "independent")
    assert isinstance(empty, Rows)
    fields = [getattr(empty, key) for key in ROW_FIELDS]
    assert all(v.shape == (0, 5) and v.dtype == np.int32 for v in fields)


def _random_example(rng, k):
    blocks = []
    for _ in range(rng.integers(1, 4)):
        spans = [
            (text if rng.random() < 0.5 else gen)(rng.integers(1, 100, rng.integers(1, 4)))
            for _ in range(rng.integers(1, 3))
        ]
        if rng.random() < 0.6:
            spans.append(latents(k))
        blocks.append(spans)
    return blocks


def _layout_example_reference(example, num_latents, memory_mode):
    """`layout_example` as first written (Python lists, a step per token), kept as the reference
    for the one that builds each block with numpy."""
    k = num_latents
    tokens, block_ids, roles, positions = [], [], [], []
    n_compression = 0
    for b, block in enumerate(example):
        is_compression = any(span.role == LATENT for span in block)
        block_tokens = [t for span in block for t in span.tokens]
        block_roles = [int(span.role) for span in block for _ in span.tokens]
        length = len(block_tokens)
        if memory_mode == "recurrent":
            start = len(tokens)
        elif is_compression:
            start = n_compression * k - (length - k)
        else:
            start = n_compression * k
        tokens += block_tokens
        roles += block_roles
        block_ids += [b] * length
        positions += range(start, start + length)
        n_compression += is_compression
    arrays = (tokens, block_ids, roles, positions)
    return {key: np.asarray(a, dtype=np.int32) for key, a in zip(_KEYS, arrays, strict=True)}


_KEYS = ("tokens", "block_ids", "roles", "positions")


@pytest.mark.parametrize("mode", ["independent", "recurrent"])
def test_layout_example_equals_the_reference(mode):
    rng = np.random.default_rng(1)
    for k in (1, 3):
        for _ in range(200):
            example = _random_example(rng, k)
            got = layout_example(example, k, mode)
            want = _layout_example_reference(example, k, mode)
            assert set(got) == set(want)
            for key in _KEYS:
                assert got[key].dtype == np.int32, key
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_span_ids_from_any_iterable():
    assert text(iter([4, np.int64(5)])) == text(x for x in (4, 5)) == Span(TEXT, (4, 5))
    assert all(type(t) is int for t in text(np.array([4, 5], np.int32)).tokens)
    assert gen(range(3)).tokens == (0, 1, 2)


@pytest.mark.parametrize("mode", ["independent", "recurrent"])
def test_row_packer_streaming_equals_pack_examples(mode):
    rng = np.random.default_rng(0)
    k, seq_len = 2, 24
    examples = [_random_example(rng, k) for _ in range(40)]
    packer = RowPacker(seq_len, k, mode)
    streamed = []
    fill = 0
    for example in examples:
        n = len(layout_example(example, k, mode)["tokens"])
        finished = packer.add(example)
        # A row is handed out exactly when the next example does not fit in it.
        assert len(finished) == (1 if fill and fill + n > seq_len else 0)
        fill = n if finished else fill + n
        streamed += finished
    streamed += packer.flush()
    assert packer.flush() == []
    packed = pack_examples(examples, seq_len, k, mode)
    assert packed.tokens.shape[0] == len(streamed) > 1
    for key in ROW_FIELDS:
        np.testing.assert_array_equal(np.stack([r[key] for r in streamed]), getattr(packed, key))
    # Every example lands whole and in order: concatenating each row's segments gives them back.
    laid = [layout_example(e, k, mode) for e in examples]
    got = [
        packed.tokens[r][packed.segment_ids[r] == s]
        for r in range(len(streamed))
        for s in range(1, packed.segment_ids[r].max() + 1)
    ]
    assert len(got) == len(laid)
    for g, want in zip(got, laid, strict=True):
        np.testing.assert_array_equal(g, want["tokens"])


def test_packer_state_survives_a_bad_example():
    packer = RowPacker(6, 1, "independent")
    assert packer.add([[gen([1, 2])]]) == []
    with pytest.raises(LayoutError, match="example 1"):
        packer.add([[gen([1] * 7)]])
    assert packer.add([[gen([3])]]) == []
    (row,) = packer.flush()
    np.testing.assert_array_equal(row["tokens"], [1, 2, 3, 0, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 2, 0, 0, 0])


# ---------------------------------------------------------------------------------------------
# Validation: every error names what is wrong and where.


def _span_with_role(role):
    # Under the tests' beartype hook `Span(7, ...)` already fails at construction; without it
    # (production) the layout check is what catches a bad role.
    span = Span(TEXT, (1,))
    object.__setattr__(span, "role", role)
    return span


BAD_EXAMPLES = {
    "empty_example": ([], ["example 1", "empty example"]),
    "empty_block": ([[text([1]), latents(2)], []], ["example 1, block 1", "empty block"]),
    "empty_span": ([[text([1]), gen([])]], ["example 1, block 0, span 1", "empty span"]),
    "latents_not_at_end": (
        [[text([1]), latents(2), gen([2])]],
        ["example 1, block 0, span 1", "followed by a GEN span", "end of their block"],
    ),
    "too_many_latents": ([[text([1]), latents(3)]], ["block 0, span 1", "3 latents", "=2"]),
    "too_few_latents": ([[gen([1])], [text([1]), latents(1)]], ["block 1, span 1", "1 latents"]),
    "two_latent_spans": (
        [[text([1]), Span(LATENT, (0,)), Span(LATENT, (1,))]],
        ["example 1, block 0", "2 LATENT spans", "exactly one"],
    ),
    "latent_indices": (
        [[text([1]), Span(LATENT, (1, 0))]],
        ["block 0, span 1", "latent indices 0..1", "[1, 0]"],
    ),
    "pad_role": ([[text([1]), Span(PAD, (0,))]], ["block 0, span 1", "PAD"]),
    "unknown_role": ([[_span_with_role(7)]], ["block 0, span 0", "unknown role 7"]),
    "negative_token": ([[text([1, -3])]], ["block 0, span 0", "negative token id -3"]),
    "too_long": ([[text([1] * 8), latents(2)]], ["example 1", "10 tokens", "seq_len=9"]),
}


@pytest.mark.parametrize("name", sorted(BAD_EXAMPLES))
def test_bad_example_errors(name):
    bad, needles = BAD_EXAMPLES[name]
    good = [[gen([1])]]
    with pytest.raises(LayoutError) as info:
        pack_examples([good, bad, good], 9, 2, "independent")
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    if name != "too_long":
        # The same check fires when laying out one example (no example index then).
        with pytest.raises(LayoutError) as info:
            layout_example(bad, 2, "recurrent")
        assert needles[-1] in str(info.value)


def test_bad_settings():
    with pytest.raises(LayoutError, match="memory_mode.*'shared'"):
        layout_example(QUERY, 2, "shared")
    with pytest.raises(LayoutError, match="memory_mode"):
        pack_examples([QUERY], 16, 2, "shared")
    with pytest.raises(LayoutError, match="memory_mode"):
        RowPacker(16, 2, "shared")
    with pytest.raises(LayoutError, match="num_latents"):
        layout_example(QUERY, 0, "independent")
    with pytest.raises(LayoutError, match="seq_len"):
        RowPacker(0, 2, "independent")
    assert issubclass(LayoutError, ValueError)
