"""Examples (lists of blocks of role-tagged spans) -> packed fixed-length rows (DESIGN.md 1-3).

An example is a sequence of blocks; a block is a sequence of spans; a span is a run of token ids
sharing one role. `layout_example` turns one example into flat per-token arrays (tokens, block ids,
roles, RoPE positions); `RowPacker` / `pack_examples` pack laid-out examples greedily into rows of a
fixed length and add `segment_ids`. At LATENT slots `tokens` holds the latent index k in [0, K).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Sequence

import numpy as np

from grc_jax.core.batch import ROW_FIELDS, Rows
from grc_jax.core.constants import MEMORY_MODES
from grc_jax.core.errors import DataError
from grc_jax.core.roles import GEN, LATENT, PAD, TEXT, Role

_EXAMPLE_KEYS = ("tokens", "block_ids", "roles", "positions")


class LayoutError(DataError):
    """An example cannot be laid out: the message names the example, block and span at fault."""


@dataclasses.dataclass(frozen=True)
class Span:
    """A run of tokens sharing one role. For LATENT spans the tokens are latent indices 0..K-1."""

    role: Role
    tokens: tuple[int, ...]

    def __post_init__(self):
        # Without the test-time type checker a list or numpy array may come in: store a hashable
        # tuple of plain ints all the same.
        object.__setattr__(self, "tokens", _int_tuple(self.tokens))


def _int_tuple(ids: Iterable[int | np.integer]) -> tuple[int, ...]:
    """`ids` as a tuple of plain ints (`int(t)` of each), converted by numpy rather than a
    Python loop per token."""
    if isinstance(ids, (tuple, list)) and set(map(type, ids)) <= {int}:
        return tuple(ids)  # already plain ints (a tokenizer's output)
    if not isinstance(ids, (tuple, list, np.ndarray)):
        ids = list(ids)
    return tuple(np.asarray(ids, dtype=np.int64).reshape(-1).tolist())


Block = Sequence[Span]
Example = Sequence[Block]


def text(ids: Iterable[int | np.integer]) -> Span:
    """A context span (no loss)."""
    return Span(TEXT, _int_tuple(ids))


def gen(ids: Iterable[int | np.integer]) -> Span:
    """A generation-target span (next-token loss)."""
    return Span(GEN, _int_tuple(ids))


def latents(k: int) -> Span:
    """The K latent slots that end a compression block (tokens are the latent indices 0..k-1)."""
    return Span(LATENT, tuple(range(int(k))))


def _check_mode(memory_mode: str) -> None:
    if memory_mode not in MEMORY_MODES:
        raise LayoutError(f"memory_mode: expected one of {MEMORY_MODES}, got {memory_mode!r}")


def _check_num_latents(num_latents: int) -> None:
    if isinstance(num_latents, bool) or not isinstance(num_latents, (int, np.integer)):
        raise LayoutError(f"num_latents: expected a positive integer, got {num_latents!r}")
    if num_latents <= 0:
        raise LayoutError(f"num_latents: expected a positive integer, got {num_latents!r}")


def _where(example_index: int | None, block: int | None = None, span: int | None = None) -> str:
    parts = ["example" if example_index is None else f"example {example_index}"]
    if block is not None:
        parts.append(f"block {block}")
    if span is not None:
        parts.append(f"span {span}")
    return ", ".join(parts)


def _check_block(block: Block, num_latents: int, example_index: int | None, b: int) -> bool:
    """Validate one block; return whether it is a compression block."""
    if len(block) == 0:
        raise LayoutError(
            f"{_where(example_index, b)}: empty block (a block needs at least one span)"
        )
    latent_spans = []
    for s, span in enumerate(block):
        where = _where(example_index, b, s)
        if not isinstance(span, Span):
            raise LayoutError(f"{where}: expected a Span, got {type(span).__name__}")
        try:
            role = Role(span.role)
        except ValueError:
            raise LayoutError(
                f"{where}: unknown role {span.role!r}; expected TEXT, GEN or LATENT"
            ) from None
        if role == PAD:
            raise LayoutError(f"{where}: role PAD is reserved for packing padding, not for input")
        if len(span.tokens) == 0:
            raise LayoutError(f"{where}: empty span ({role.name} with no tokens)")
        if min(span.tokens) < 0:
            first = next(t for t in span.tokens if t < 0)
            raise LayoutError(f"{where}: negative token id {first} in a {role.name} span")
        if role == LATENT:
            latent_spans.append(s)
    if not latent_spans:
        return False
    if len(latent_spans) > 1:
        raise LayoutError(
            f"{_where(example_index, b)}: {len(latent_spans)} LATENT spans (spans {latent_spans}); "
            f"a compression block ends with exactly one span of num_latents={num_latents} latents"
        )
    s = latent_spans[0]
    where = _where(example_index, b, s)
    if s != len(block) - 1:
        raise LayoutError(
            f"{where}: LATENT span is followed by a {Role(block[s + 1].role).name} span; "
            "latents must be at the end of their block"
        )
    n = len(block[s].tokens)
    if n != num_latents:
        raise LayoutError(f"{where}: block has {n} latents, expected num_latents={num_latents}")
    if block[s].tokens != tuple(range(num_latents)):
        raise LayoutError(
            f"{where}: latent tokens must be the latent indices 0..{num_latents - 1} in order, "
            f"got {list(block[s].tokens)}"
        )
    return True


def layout_example(
    example: Example,
    num_latents: int,
    memory_mode: str,
    *,
    example_index: int | None = None,
) -> dict[str, np.ndarray]:
    """Lay out one example as 1-D int32 arrays `tokens`, `block_ids`, `roles`, `positions`.

    Positions (DESIGN.md 3): in `independent` mode compression block m (counting only compression
    blocks) puts its K latents at [m*K, (m+1)*K) and its n_m other tokens at m*K - n_m .. m*K - 1
    (negative positions are intended: RoPE sees only differences); a consumer block starts at M*K,
    M = compression blocks before it. In `recurrent` mode positions run 0, 1, 2, ... through the
    example. `example_index` only labels error messages.
    """
    _check_mode(memory_mode)
    _check_num_latents(num_latents)
    if len(example) == 0:
        raise LayoutError(f"{_where(example_index)}: empty example (it needs at least one block)")
    k = int(num_latents)
    # Per block and span here, per token only inside numpy: each span's length and role, each
    # block's length and its first position less its first token's index.
    span_lengths, span_roles, block_lengths, offsets = [], [], [], []
    n_tokens = n_compression = 0
    for block_index, block in enumerate(example):
        is_compression = _check_block(block, k, example_index, block_index)
        lengths = [len(span.tokens) for span in block]
        length = sum(lengths)
        if memory_mode == "recurrent":
            start = n_tokens
        elif is_compression:
            start = n_compression * k - (length - k)
        else:
            start = n_compression * k
        span_lengths += lengths
        span_roles += [int(span.role) for span in block]
        block_lengths.append(length)
        offsets.append(start - n_tokens)
        n_tokens += length
        n_compression += is_compression
    all_ids = itertools.chain.from_iterable(span.tokens for block in example for span in block)
    positions = np.arange(n_tokens, dtype=np.int32)
    positions += np.repeat(np.asarray(offsets, np.int32), block_lengths)
    return {
        "tokens": np.fromiter(all_ids, np.int32, n_tokens),
        "block_ids": np.repeat(np.arange(len(example), dtype=np.int32), block_lengths),
        "roles": np.repeat(np.asarray(span_roles, np.int32), span_lengths),
        "positions": positions,
    }


def _empty_row(seq_len: int) -> dict[str, np.ndarray]:
    # Padding: token 0, segment 0, block 0, role PAD (= 0), position 0.
    assert int(PAD) == 0
    return {key: np.zeros(seq_len, np.int32) for key in ROW_FIELDS}


class RowPacker:
    """Streaming greedy packer: examples go into the current row while they fit, else a new row.

    Examples are never split. `add` returns the rows it finished (zero or one); `flush` returns the
    partly filled last row, if any. Each row is a dict of 1-D int32 arrays of length `seq_len`
    with keys `ROW_FIELDS`; `segment_ids` count 1, 2, 3, ... per example within a row, 0 = padding.
    """

    def __init__(self, seq_len: int, num_latents: int, memory_mode: str):
        if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len <= 0:
            raise LayoutError(f"seq_len: expected a positive integer, got {seq_len!r}")
        _check_mode(memory_mode)
        _check_num_latents(num_latents)
        self.seq_len = int(seq_len)
        self.num_latents = int(num_latents)
        self.memory_mode = memory_mode
        self._row: dict[str, np.ndarray] | None = None
        self._fill = 0  # tokens used in the current row
        self._segments = 0  # examples in the current row
        self._examples_seen = 0  # labels error messages

    def add(self, example: Example) -> list[dict[str, np.ndarray]]:
        """Lay out and place one example; return the rows this finished (zero or one)."""
        index = self._examples_seen
        self._examples_seen += 1
        laid = layout_example(example, self.num_latents, self.memory_mode, example_index=index)
        n = len(laid["tokens"])
        if n > self.seq_len:
            raise LayoutError(
                f"{_where(index)}: {n} tokens do not fit in a row of seq_len={self.seq_len} "
                "(examples are never split across rows)"
            )
        finished = []
        if self._row is not None and self._fill + n > self.seq_len:
            finished = self.flush()
        if self._row is None:
            self._row = _empty_row(self.seq_len)
        sl = slice(self._fill, self._fill + n)
        for key in _EXAMPLE_KEYS:
            self._row[key][sl] = laid[key]
        self._segments += 1
        self._row["segment_ids"][sl] = self._segments
        self._fill += n
        return finished

    def flush(self) -> list[dict[str, np.ndarray]]:
        """Finish the current row (padded to seq_len); return it, or nothing if it is empty."""
        if self._row is None:
            return []
        row, self._row, self._fill, self._segments = self._row, None, 0, 0
        return [row]


def stack_rows(rows: Sequence[dict[str, np.ndarray]], seq_len: int) -> Rows:
    """Rows from `RowPacker` -> `Rows` of int32 `[n_rows, seq_len]` arrays."""
    if not rows:
        return Rows(*(np.zeros((0, seq_len), np.int32) for _ in ROW_FIELDS))
    return Rows(*(np.stack([row[key] for row in rows]) for key in ROW_FIELDS))


def pack_examples(
    examples: Iterable[Example], seq_len: int, num_latents: int, memory_mode: str
) -> Rows:
    """Pack examples greedily in order into `Rows` of int32 `[n_rows, seq_len]` arrays."""
    packer = RowPacker(seq_len, num_latents, memory_mode)
    rows = []
    for example in examples:
        rows += packer.add(example)
    rows += packer.flush()
    return stack_rows(rows, seq_len)


def one_per_row(
    examples: Sequence[Example], num_latents: int, memory_mode: str, bucket: int = 32
) -> Rows:
    """Lay out each example in its own row, padded to a multiple of `bucket` tokens (so that
    inference and evaluation passes compile for few distinct shapes)."""
    laid = [layout_example(e, num_latents, memory_mode) for e in examples]
    longest = max(len(e["tokens"]) for e in laid)
    t = max(bucket, -(-longest // bucket) * bucket)
    rows = {key: np.zeros((len(laid), t), np.int32) for key in ROW_FIELDS}
    for i, e in enumerate(laid):
        n = len(e["tokens"])
        for key in _EXAMPLE_KEYS:
            rows[key][i, :n] = e[key]
        rows["segment_ids"][i, :n] = 1
    return Rows(**rows)
