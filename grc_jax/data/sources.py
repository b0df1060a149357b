"""Random-access record sources for grain: JSONL files and ArrayRecord shards (and a wrapper
counting the records read).

Each record is `(where, raw_line)` with `where` = `path:line` so that parse errors can name it.
"""

from __future__ import annotations

import glob
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from grc_jax.core.errors import DataError, MissingPathError
from grc_jax.data.schema import BadLineError, GRCRecord, parse_record


class JsonlSource:
    """Lines of one or more JSONL files, indexed by byte offsets (blank lines skipped)."""

    def __init__(self, paths: str | Path | Sequence[str | Path]):
        if isinstance(paths, (str, Path)):
            paths = [paths]
        self.paths = [Path(p) for p in paths]
        self.name = ", ".join(str(p) for p in self.paths)  # names the data in error messages
        self.total_lines = 0  # blank ones included
        self._file: list[int] = []
        self._line: list[int] = []
        self._offset: list[int] = []
        self._length: list[int] = []
        for i, path in enumerate(self.paths):
            if not path.is_file():
                raise MissingPathError(f"data file {str(path)!r} does not exist")
            offset = 0
            with path.open("rb") as f:
                for line_no, line in enumerate(f, start=1):
                    if line.strip():
                        self._file.append(i)
                        self._line.append(line_no)
                        self._offset.append(offset)
                        self._length.append(len(line))
                    offset += len(line)
                    self.total_lines += 1
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._offset)

    def __getitem__(self, index: int) -> tuple[str, bytes]:
        # pread: no shared file position, so grain's reader threads can call this concurrently.
        i = self._file[index]
        fd = self._fds.get(i)
        if fd is None:
            with self._lock:
                fd = self._fds.get(i)
                if fd is None:
                    fd = self._fds[i] = os.open(self.paths[i], os.O_RDONLY)
        line = os.pread(fd, self._length[index], self._offset[index])
        return f"{self.paths[i]}:{self._line[index]}", line

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"] = {}
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)


class ArrayRecordSource:
    """ArrayRecord shards written by `prepare_array_record` (records are the JSONL lines)."""

    def __init__(self, pattern: str):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.paths = sorted(glob.glob(pattern))
        self.name = pattern
        if not self.paths:
            raise MissingPathError(f"no ArrayRecord shards match {pattern!r}")
        self._source = ArrayRecordDataSource(self.paths)
        sizes = [ArrayRecordDataSource([p]).__len__() for p in self.paths]
        self._starts = np.cumsum([0] + sizes)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> tuple[str, bytes]:
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        where = f"{self.paths[shard]}#{index - int(self._starts[shard])}"
        return where, self._source[index]


class CountedSource:
    """A record source (`JsonlSource`, `ArrayRecordSource`) that notes which of its records have
    been read, one bit per record: `records_read` counts the distinct records read so far.

    With several processes each reads only its share of the records; this is how a run shows it
    (`data/records_read` in metrics.jsonl, the per-process counts at the end of `grc train`).
    Safe for grain's reader threads."""

    def __init__(self, source: JsonlSource | ArrayRecordSource):
        self.source = source
        self.name = getattr(source, "name", type(source).__name__)  # for error messages
        self.total_lines = getattr(source, "total_lines", 0)
        self.records_read = 0
        self._bits = np.zeros((len(source) + 7) // 8, np.uint8)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[str, bytes]:
        item = self.source[index]
        byte, bit = divmod(int(index), 8)
        with self._lock:
            if not (self._bits[byte] >> bit) & 1:
                self._bits[byte] |= 1 << bit
                self.records_read += 1
        return item


def prepare_array_record(
    jsonl: str | Path, out_prefix: str | Path, num_shards: int = 4
) -> list[str]:
    """Convert a JSONL file into ArrayRecord shards `<prefix>-0000i-of-0000n.arrayrecord`."""
    from array_record.python.array_record_module import ArrayRecordWriter

    source = JsonlSource(jsonl)
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = [f"{out_prefix}-{i:05d}-of-{num_shards:05d}.arrayrecord" for i in range(num_shards)]
    writers = [ArrayRecordWriter(p, "group_size:1") for p in paths]
    per_shard = -(-len(source) // num_shards)
    for index in range(len(source)):
        writers[index // per_shard].write(source[index][1].rstrip(b"\n"))
    for w in writers:
        w.close()
    return paths


def open_source(spec: str) -> JsonlSource | ArrayRecordSource:
    """`*.jsonl` files (comma-separated or a glob) or an ArrayRecord glob (`*.arrayrecord`)."""
    if ".arrayrecord" in spec:
        return ArrayRecordSource(spec)
    paths = [p for part in spec.split(",") for p in (sorted(glob.glob(part)) or [part])]
    return JsonlSource(paths)


def no_usable_record(
    source: Any, skipped: Sequence[str], part: str = "", lines: int | None = None
) -> DataError:
    """The error for data without a single usable record: `<name>: no usable record (...)`, saying
    what was found (an empty file, only blank lines, or `lines` (default: all the source's) lines
    all skipped, with the first). `part` names a share of the data, e.g. one process's."""
    name = getattr(source, "name", type(source).__name__)
    n = len(source) if lines is None else lines
    if n == 0:
        total = getattr(source, "total_lines", 0)
        found = f"{total} lines, all blank" if total else "empty"
    elif skipped:
        found = f"{n} lines, all skipped as bad; first: {skipped[0]}"
    else:
        found = f"{n} lines"
    return DataError(f"{name}: no usable record{part} ({found})")


def scan_records(
    data: str | Path | Any, skip_bad_lines: bool = False, limit: int | None = None
) -> tuple[list[GRCRecord], list[str]]:
    """The records of `data` (a `data.*_path` spec, see `open_source`, or an opened source) in
    file order, the first `limit` usable ones (default: all), and the `file:line: reason` of each
    line skipped as bad.

    The skip policy of the training pipeline (`data.skip_bad_lines`): a bad line raises
    `BadLineError`, or with `skip_bad_lines` is skipped and listed. Data without a usable record
    (empty, only blank lines, every line bad) raises `DataError` naming it and what was found.
    """
    source = open_source(str(data)) if isinstance(data, (str, Path)) else data
    records: list[GRCRecord] = []
    skipped: list[str] = []
    for index in range(len(source)):
        if limit is not None and len(records) >= limit:
            break
        where, line = source[index]
        try:
            records.append(parse_record(line, where))
        except BadLineError as e:
            if not skip_bad_lines:
                raise
            skipped.append(str(e))
    if not records and limit != 0:
        raise no_usable_record(source, skipped)
    return records, skipped


def read_records(
    path: str | Path, limit: int | None = None, skip_bad_lines: bool = False
) -> list[GRCRecord]:
    """The first `limit` (default: all) records of `path`, parsed strictly unless
    `skip_bad_lines`; see `scan_records`."""
    return scan_records(path, skip_bad_lines, limit)[0]
