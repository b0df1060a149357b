"""The GRC training pipeline on grain: records -> token groups -> packed, checkpointable batches.

One record (a query, its positive and hard negatives) becomes a **group** of examples
(`grc_jax.data.groups`, DESIGN.md section 4): a query and its documents, plus for a chosen
fraction of records a RAG example (`data.rag_fraction`) or a recurrent chain
(`data.recurrent_fraction`). `loss_targets` derives the next-token targets and which of them count
for `L_gen` or `L_comp` from the packed rows alone.

Groups are packed whole into the rows of one batch, so every query meets its positive and hard
negatives in the same batch. Packing is deterministic and its iterator state is small, so the
data position is saved with every checkpoint.

Bad data: a line that breaks the schema (`BadLineError`) or a record whose group cannot fit in one
batch is named by `file:line`. Without `data.skip_bad_lines`, `grc train` reads every record before
step 1 and stops at the first such one (`DataError`); with it, such a record is skipped and counted
when grain reads it (`RecordParser`); the decision depends on the record alone, so a resumed run
skips the same records again. (A RAG example or chain that would make a fitting group too large is
left out instead: it is optional.) Data without a usable record stops at once rather than being
read round and round.
"""

from __future__ import annotations

import zlib
from typing import Any

import grain
import numpy as np

from grc_jax.core.batch import ROW_FIELDS, Batch, Rows
from grc_jax.core.config import Config
from grc_jax.core.errors import ConfigError, DataError
from grc_jax.core.roles import GEN, LATENT
from grc_jax.data.groups import Group, extra_examples, make_group
from grc_jax.data.layout import layout_example
from grc_jax.data.schema import BadLineError, GRCRecord, parse_record
from grc_jax.data.sources import no_usable_record
from grc_jax.data.tokenizer import Tokenizer


def consumer_tokens(
    segment_ids: np.ndarray, block_ids: np.ndarray, roles: np.ndarray
) -> np.ndarray:
    """`[B, T]` bool: the token's block is a consumer block, i.e. it holds no latents and comes
    after the first compression block (a block with latents) of its example. Ids are
    non-negative (as packing makes them); segments and blocks need not be contiguous."""
    b = segment_ids.shape[0]
    # Whole batches at once, keyed by (row, segment) and (row, segment, block).
    n_seg = int(segment_ids.max(initial=0)) + 1
    n_blk = int(block_ids.max(initial=0)) + 1
    seg_key = np.arange(b, dtype=np.int64)[:, None] * n_seg + segment_ids
    blk_key = seg_key * n_blk + block_ids
    latent_keys = blk_key[roles == LATENT]
    if b * n_seg * n_blk <= max(4 * segment_ids.size, 1 << 16):
        # A table [example, block] -> holds latents (small for packed rows: few examples a row,
        # few blocks an example).
        table = np.zeros((b * n_seg, n_blk), bool)
        table.reshape(-1)[latent_keys] = True
        in_compression = table.reshape(-1)[blk_key]
        first = np.where(table.any(axis=1), table.argmax(axis=1), n_blk)
    else:
        # Ids too sparse for a table: the sorted compression-block keys instead.
        comp = np.unique(latent_keys)
        found = np.searchsorted(comp, blk_key).clip(max=max(comp.size - 1, 0))
        in_compression = comp[found] == blk_key if comp.size else np.zeros(blk_key.shape, bool)
        example = comp // n_blk
        starts = np.ones(comp.size, bool)
        starts[1:] = example[1:] != example[:-1]  # the first (lowest) block of each example
        first = np.full(b * n_seg, n_blk, np.int64)
        first[example[starts]] = comp[starts] % n_blk
    return ~in_compression & (block_ids > first[seg_key])


def loss_targets(rows: Rows) -> dict[str, np.ndarray]:
    """`targets`, `gen_weights`, `comp_weights` `[B, T]` from packed rows (see train/losses.py)."""
    tokens, seg, blk, roles = rows.tokens, rows.segment_ids, rows.block_ids, rows.roles
    b, t = tokens.shape
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    nxt = np.zeros((b, t), bool)
    nxt[:, :-1] = (
        (roles[:, 1:] == GEN) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
        & (blk[:, 1:] == blk[:, :-1])
    )  # fmt: skip
    # A target counts for L_comp when its block is a consumer block (consumer_tokens); every
    # other GEN target (compression blocks, plain generation examples) counts for L_gen.
    consumer = consumer_tokens(seg, blk, roles)
    target_consumer = np.zeros((b, t), bool)
    target_consumer[:, :-1] = consumer[:, 1:]
    return {
        "targets": targets,
        "gen_weights": (nxt & ~target_consumer).astype(np.float32),
        "comp_weights": (nxt & target_consumer).astype(np.float32),
    }


def first_fit(
    lengths: list[int], fill: list[int], used: list[int], seq_len: int, slots: int
) -> list[tuple[int, int, int]] | None:
    """(row, start, slot) for examples of `lengths` placed in turn into the first row with room
    (updating `fill` and `used`, the tokens and examples of each row); None if one can't be."""
    plan = []
    for n in lengths:
        row = next(
            (r for r in range(len(fill)) if fill[r] + n <= seq_len and used[r] < slots), None
        )
        if row is None:
            return None
        plan.append((row, fill[row], used[row]))
        fill[row] += n
        used[row] += 1
    return plan


class BatchBuilder:
    """Places groups whole into `rows` rows of `seq_len` tokens, at most `slots` examples a row."""

    def __init__(
        self, rows: int, seq_len: int, slots: int, group_id_stride: int, group_id_offset: int
    ):
        self.rows, self.seq_len, self.slots = rows, seq_len, slots
        self.stride, self.offset = group_id_stride, group_id_offset
        self.reset()

    def reset(self) -> None:
        self.arrays = {key: np.zeros((self.rows, self.seq_len), np.int32) for key in ROW_FIELDS}
        self.meta = {
            key: np.zeros((self.rows, self.slots), np.int32)
            for key in ("seg_kind", "seg_group", "seg_positive", "seg_doc")
        }
        self.fill = [0] * self.rows
        self.used = [0] * self.rows
        self.groups = 0

    def fits_alone(self, group: Group) -> bool:
        """Whether `group` fits into an empty batch (else it never can)."""
        lengths = [len(ex["tokens"]) for ex in group.examples]
        fill, used = [0] * self.rows, [0] * self.rows
        return first_fit(lengths, fill, used, self.seq_len, self.slots) is not None

    def try_add(self, group: Group) -> bool:
        """Place every example of `group` (first fit); False, and nothing placed, if one can't."""
        fill, used = list(self.fill), list(self.used)
        lengths = [len(ex["tokens"]) for ex in group.examples]
        plan = first_fit(lengths, fill, used, self.seq_len, self.slots)
        if plan is None:
            return False
        gid = self.groups * self.stride + self.offset
        for i, (ex, (row, start, slot)) in enumerate(zip(group.examples, plan)):
            sl = slice(start, start + len(ex["tokens"]))
            for key in ("tokens", "block_ids", "roles", "positions"):
                self.arrays[key][row, sl] = ex[key]
            self.arrays["segment_ids"][row, sl] = slot + 1
            self.meta["seg_kind"][row, slot] = group.kinds[i]
            self.meta["seg_group"][row, slot] = gid
            self.meta["seg_positive"][row, slot] = group.positive[i]
            self.meta["seg_doc"][row, slot] = group.docs[i]
        self.fill, self.used = fill, used
        self.groups += 1
        return True

    def finish(self) -> Batch:
        rows = Rows(**self.arrays)
        batch = Batch(**self.arrays, **self.meta, **loss_targets(rows))
        self.reset()
        return batch


class GRCBatchDataset(grain.IterDataset):
    """Packs a parent iterator of `Group`s into `Batch`es; see `BatchBuilder`."""

    def __init__(self, parent: grain.IterDataset, builder_args: dict[str, int]):
        super().__init__(parent)
        self.builder_args = builder_args

    def __iter__(self) -> grain.DatasetIterator:
        return _GRCBatchIterator(self._parent.__iter__(), BatchBuilder(**self.builder_args))


class _GRCBatchIterator(grain.DatasetIterator):
    # State = the parent's state just before the first group not yet in an emitted batch. A group
    # that did not fit is kept in memory and re-read from the parent after a restore.

    def __init__(self, parent: grain.DatasetIterator, builder: BatchBuilder):
        super().__init__(parent)
        self.builder = builder
        self._pending: Group | None = None
        self._pending_state = parent.get_state()

    def __next__(self) -> Batch:
        while True:
            if self._pending is None:
                self._pending_state = self._parent.get_state()
                try:
                    self._pending = next(self._parent)
                except StopIteration:
                    # Finite data (num_epochs set): the last, partly filled batch still counts.
                    if self.builder.groups:
                        return self.builder.finish()
                    raise
            if self.builder.try_add(self._pending):
                self._pending = None
                continue
            if self.builder.groups == 0:
                n = sum(len(e["tokens"]) for e in self._pending.examples)
                raise DataError(
                    f"a record's group of {len(self._pending.examples)} examples ({n} tokens) does "
                    f"not fit in one batch of {self.builder.rows} rows x {self.builder.seq_len} "
                    "tokens; raise data.seq_len or data.batch_size, or use fewer negatives"
                )
            return self.builder.finish()

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._pending_state if self._pending is not None else self._parent.get_state()
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = None
        self.builder.reset()


class SkippedLine:
    """Marks a record skipped under `data.skip_bad_lines` (not None: grain drops None silently):
    a bad line, or a group too large for a batch. `reason` starts with `where` (`file:line`);
    `index` is the record's position in the repeated data stream (None: unknown)."""

    def __init__(self, where: str, reason: str = "", index: int | None = None):
        self.where = where
        self.reason = reason or f"{where}: bad line"
        self.index = index


class RecordParser:
    """record source item -> `GRCRecord`; a bad line raises, or with `skip_bad_lines` becomes a
    `SkippedLine`. Parsing runs in grain's read-ahead threads, so skipped records are counted by
    `skip` in the consumer's thread (`SkipCounter`): lines read ahead but never used are not.

    `bad_lines` counts the records skipped, bad lines and groups too large for a batch, each once
    (in its first epoch; later epochs skip it again uncounted; a resumed iterator continues the
    count of its checkpoint). `first_skipped` holds the `file:line: reason` of the first `FIRST`
    distinct records that this process skipped (after a resume, ones skipped again).
    """

    FIRST = 5

    def __init__(self, skip_bad_lines: bool):
        self.skip_bad_lines = skip_bad_lines
        self.bad_lines = 0
        self.first_skipped: list[str] = []

    def __call__(self, item: tuple[str, bytes]) -> GRCRecord | SkippedLine:
        where, line = item
        try:
            return parse_record(line, where)
        except BadLineError as e:
            if not self.skip_bad_lines:
                raise
            return SkippedLine(where, str(e))

    def reject(self, index: int, where: str, reason: str) -> SkippedLine:
        """A record that parsed but cannot be used: `DataError(f"{where}: {reason}")`, or with
        `skip_bad_lines` a `SkippedLine`."""
        if not self.skip_bad_lines:
            raise DataError(f"{where}: {reason}")
        return SkippedLine(where, f"{where}: {reason}", index)

    def skip(self, skipped: SkippedLine, new: bool = True) -> None:
        """Note `skipped`; count it if `new` (not skipped in an earlier epoch)."""
        self.bad_lines += new
        if len(self.first_skipped) < self.FIRST and skipped.reason not in self.first_skipped:
            self.first_skipped.append(skipped.reason)


class SkipCounter(grain.IterDataset):
    """Drops the `SkippedLine`s of its parent, counting them in `parser`, and stops with
    `DataError` once a whole pass over the data (`pass_len` records) has yielded no usable record,
    where a filter would read the data round and round forever."""

    def __init__(
        self, parent: grain.IterDataset, parser: RecordParser, source: Any, pass_len: int,
        part: str = "",
    ):  # fmt: skip
        super().__init__(parent)
        self.parser, self.source, self.pass_len, self.part = parser, source, pass_len, part

    def __iter__(self) -> grain.DatasetIterator:
        return _SkipCounterIterator(self._parent.__iter__(), self)


class _SkipCounterIterator(grain.DatasetIterator):
    # State = the parent's state and the count of records skipped before it. From the start, the
    # first `pass_len` records are one whole epoch; from a restored mid-epoch position, a usable
    # record (once per epoch) is at most 2 * pass_len - 2 records away.

    def __init__(self, parent: grain.DatasetIterator, ds: SkipCounter):
        super().__init__(parent)
        self.ds = ds
        self._run = 0  # records skipped since the start (or restore) with none usable
        self._limit: int | None = ds.pass_len  # None once a usable record has been seen

    def __next__(self) -> Any:
        while True:
            item = next(self._parent)
            if not isinstance(item, SkippedLine):
                self._limit = None
                return item
            # Each epoch has every record once: one not in the first was skipped before.
            self.ds.parser.skip(item, new=item.index is None or item.index < self.ds.pass_len)
            self._run += 1
            if self._limit is not None and self._run >= self._limit:
                first = self.ds.parser.first_skipped or [item.reason]
                raise no_usable_record(self.ds.source, first, self.ds.part, self.ds.pass_len)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "bad_lines": self.ds.parser.bad_lines}

    def set_state(self, state: dict[str, Any]) -> None:
        if set(state) != {"parent", "bad_lines"}:  # a checkpoint from before the count was kept
            state = {"parent": state, "bad_lines": 0}
        self._parent.set_state(state["parent"])
        self.ds.parser.bad_lines = state["bad_lines"]
        self._run, self._limit = 0, 2 * self.ds.pass_len - 1


def slots_per_row(cfg: Config) -> int:
    """Most examples one row can hold: each has at least bos + K latents + bos + 1 target."""
    return max(1, cfg.data.seq_len // (cfg.grc.num_latents + 3))


def train_dataset(
    cfg: Config,
    tok: Tokenizer,
    source: Any,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    check_all: bool = False,
) -> tuple[grain.IterDataset, RecordParser]:
    """This process's share of the training batches: its rows (global batch / processes), packed
    from its own share of the records (every `process_count`-th, from `process_index`), with group
    ids `n * process_count + process_index`, unique over the global batch.
    `check_all`: without `data.skip_bad_lines`, read and lay out every record of this share first,
    raising the `DataError` (naming `file:line`) of the first that the pipeline would refuse."""
    if cfg.data.batch_size % process_count:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is not divisible by {process_count} processes"
        )
    parser = RecordParser(cfg.data.skip_bad_lines)
    k, mode = cfg.grc.num_latents, cfg.grc.memory_mode
    drop = cfg.data.reasoning_dropout
    builder_args = dict(
        rows=cfg.data.batch_size // process_count,
        seq_len=cfg.data.seq_len,
        slots=slots_per_row(cfg),
        group_id_stride=process_count,
        group_id_offset=process_index,
    )
    fit = BatchBuilder(**builder_args)

    def to_group(
        index: int, item: tuple[str, bytes], keep: bool | None = None
    ) -> Group | SkippedLine:
        record = parser(item)
        if isinstance(record, SkippedLine):
            record.index = index
            return record
        if keep is None:
            # Deterministic per record and epoch position: the same data order gives the same
            # groups.
            crc = zlib.crc32(f"{cfg.data.shuffle_seed}:{index}".encode())
            keep = (crc % 10_000) >= drop * 10_000
        group = make_group(tok, record, k, mode, with_reasoning=keep)
        if not fit.fits_alone(group):
            lengths = [len(e["tokens"]) for e in group.examples]
            return parser.reject(
                index,
                item[0],
                f"the record's group of {len(lengths)} examples ({sum(lengths)} tokens, the "
                f"longest {max(lengths)}) does not fit in one batch of {fit.rows} rows x "
                f"{fit.seq_len} tokens (at most {fit.slots} examples a row); raise data.seq_len "
                "or data.batch_size, shorten the record or its negatives, or set "
                "data.skip_bad_lines=true to skip it",
            )
        # A RAG example or chain trains extra layouts; if it would not fit in a batch with the
        # group it is left out (the record itself fits, so it is not a bad record).
        extra = extra_examples(tok, record, index, k, cfg.data)
        if extra:
            bigger = group.with_extra([layout_example(e, k, mode) for e in extra])
            if fit.fits_alone(bigger):
                return bigger
        return group

    if len(source) == 0:
        raise no_usable_record(source, [])
    # This process's share: records process_index, process_index + process_count, ... (strided,
    # so that every share samples the whole file or every shard, however the data is ordered).
    share = range(process_index, len(source), process_count)
    part = f" for process {process_index} of {process_count}" if process_count > 1 else ""
    if len(share) == 0:
        raise DataError(
            f"{getattr(source, 'name', 'the data')}: no record{part}: {len(source)} records "
            f"shared among {process_count} processes"
        )
    if check_all and not cfg.data.skip_bad_lines:
        # Up front, so that a bad line or a record too large for a batch stops the run before
        # step 1 wherever it sits in the share (each record laid out at its largest: with its
        # reasoning); with skipping on, such records are skipped and counted as they are read.
        # Each process checks only its own share: no process reads another's records.
        for index in share:
            to_group(index, source[index], keep=True)
    ds = grain.MapDataset.source(source)
    ds = ds[process_index::process_count]
    pass_len = len(ds)
    # Shuffle, then repeat: grain reseeds the shuffle per epoch, so every epoch is a permutation
    # of the records (shuffling after an infinite repeat would draw records with replacement).
    ds = ds.shuffle(seed=cfg.data.shuffle_seed).repeat(num_epochs)
    ds = ds.map_with_index(to_group)  # in grain's read-ahead threads
    ds = SkipCounter(ds.to_iter_dataset(), parser, source, pass_len, part)
    return GRCBatchDataset(ds, builder_args), parser
