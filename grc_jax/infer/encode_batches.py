"""Batches of the engine's embedding and compression passes: few shapes, little padding.

An embedding pass needs one pooled vector per text, so short texts are packed several to a row
(`packed_batches`): the model's own segment mask keeps the examples of a row apart, exactly as in
training, and each example's latents are pooled by its segment. Packing first-fit by decreasing
length fills rows of `PACK_LEN` tokens almost completely, where one text per row pads every row
to the longest of its batch. Texts longer than a packed row, and compression passes (which read
each example's latent k / v by row), run one example per row, shortest first
(`row_batches`). Rows are padded to a few counts and tokens to a few lengths, so only a bounded
set of shapes is ever compiled.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from grc_jax.core.batch import ROW_FIELDS, Rows
from grc_jax.data.layout import RowPacker, one_per_row, stack_rows

ENCODE_BATCH = 64  # rows per embedding / compression pass
PACK_LEN = 96  # tokens per packed embedding row


def length_bucket(n: int) -> int:
    """Padded row length for `n` tokens: a multiple of 16 up to 128, of 64 up to 512, then of
    256 (at most a few dozen distinct lengths to compile, padding under 50%)."""
    step = 16 if n <= 128 else 64 if n <= 512 else 256
    return max(step, -(-n // step) * step)


def row_bucket(n: int) -> int:
    """Rows of a pass over `n` rows: a power of two up to 8, then a multiple of 8."""
    return 1 << (n - 1).bit_length() if n <= 8 else -(-n // 8) * 8


def example_length(example: Sequence) -> int:
    """Tokens of an example (all its blocks' spans)."""
    return sum(len(span.tokens) for block in example for span in block)


def _pad_rows(rows: Rows, n_rows: int, length: int) -> Rows:
    pad = ((0, n_rows - rows.tokens.shape[0]), (0, length - rows.tokens.shape[1]))
    return Rows(**{k: np.pad(getattr(rows, k), pad) for k in ROW_FIELDS})


def row_batches(
    examples: Sequence, indices: Sequence[int], num_latents: int, memory_mode: str
) -> Iterator[tuple[list[int], Rows]]:
    """One example per row, shortest first, `ENCODE_BATCH` rows at most: `(indices, rows)`, the
    row `j` holding `examples[indices[j]]` (rows past `len(indices)` are padding)."""
    order = sorted(indices, key=lambda i: example_length(examples[i]))
    for i in range(0, len(order), ENCODE_BATCH):
        idx = order[i : i + ENCODE_BATCH]
        rows = one_per_row([examples[j] for j in idx], num_latents, memory_mode, bucket=1)
        yield idx, _pad_rows(rows, row_bucket(len(idx)), length_bucket(rows.tokens.shape[1]))


def _first_fit_decreasing(lengths: dict[int, int], capacity: int, max_items: int) -> list[list]:
    """Bins (lists of example indices) of at most `capacity` tokens and `max_items` examples."""
    bins: list[list[int]] = []
    room = np.zeros(0, np.int64)  # tokens left in each bin (0 once it holds max_items)
    for i in sorted(lengths, key=lambda i: -lengths[i]):
        fits = np.flatnonzero(room >= lengths[i])
        if fits.size:
            b = int(fits[0])
        else:
            b = len(bins)
            bins.append([])
            room = np.append(room, capacity)
        bins[b].append(i)
        room[b] = 0 if len(bins[b]) == max_items else room[b] - lengths[i]
    return bins


def packed_batches(
    examples: Sequence, num_latents: int, memory_mode: str
) -> Iterator[tuple[list[int], np.ndarray, Rows, int]]:
    """Every example in passes of at most `ENCODE_BATCH` rows: `(indices, at, rows, slots)`,
    example `indices[n]` in row `at[n, 0]` as segment `at[n, 1] + 1`, at most `slots` examples
    a row. Examples of up to `PACK_LEN` tokens are packed, longer ones run one per row."""
    lengths = [example_length(e) for e in examples]
    long = [i for i, n in enumerate(lengths) if n > PACK_LEN]
    for idx, rows in row_batches(examples, long, num_latents, memory_mode):
        yield idx, np.stack([np.arange(len(idx)), np.zeros(len(idx), int)], 1), rows, 1
    slots = PACK_LEN // (num_latents + 2)  # an example is at least bos, a token and its latents
    short = {i: n for i, n in enumerate(lengths) if n <= PACK_LEN}
    bins = _first_fit_decreasing(short, PACK_LEN, slots)
    for b0 in range(0, len(bins), ENCODE_BATCH):
        part = bins[b0 : b0 + ENCODE_BATCH]
        idx, at, rows = [], [], []
        for r, members in enumerate(part):
            packer = RowPacker(PACK_LEN, num_latents, memory_mode)
            for s, i in enumerate(members):
                packer.add(examples[i])
                idx.append(i)
                at.append((r, s))
            rows += packer.flush()
        packed = _pad_rows(stack_rows(rows, PACK_LEN), row_bucket(len(part)), PACK_LEN)
        yield idx, np.asarray(at), packed, slots


def gather_slots(values: Any, at: np.ndarray) -> np.ndarray:
    """`values[row, slot]` for each `(row, slot)` of `at` (`[n, 2]`)."""
    values = np.asarray(values)
    return values[at[:, 0], at[:, 1]]
