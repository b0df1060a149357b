"""Record sources: JSONL line index with `path:line` labels, thread safety, ArrayRecord shards,
counting the records read; reading records with the skip policy and refusing data without a
usable record."""

import pickle
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from grc_jax.core.errors import DataError
from grc_jax.data.schema import BadLineError, parse_record
from grc_jax.data.sources import (
    ArrayRecordSource,
    CountedSource,
    JsonlSource,
    open_source,
    prepare_array_record,
    read_records,
    scan_records,
)


@pytest.fixture
def two_files(tmp_path):
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a.write_bytes(b"L1\n\nL3\n   \nL5 x\n")
    b.write_bytes(b"\nM2\nM3 no newline")  # blank first line, no trailing newline
    expected = [
        (f"{a}:1", b"L1\n"),
        (f"{a}:3", b"L3\n"),
        (f"{a}:5", b"L5 x\n"),
        (f"{b}:2", b"M2\n"),
        (f"{b}:3", b"M3 no newline"),
    ]
    return a, b, expected


def test_jsonl_indexes_non_blank_lines_across_files(two_files):
    a, b, expected = two_files
    src = JsonlSource([a, b])
    assert len(src) == len(expected)
    assert [src[i] for i in range(len(src))] == expected
    # Random order (each file has its own descriptor; reads are positional).
    for i in [4, 0, 3, 1, 2, 4]:
        assert src[i] == expected[i]


def test_jsonl_single_path_and_pickle(two_files):
    a, _, expected = two_files
    src = JsonlSource(str(a))
    assert [src[i] for i in range(len(src))] == expected[:3]
    src[0]  # opens a descriptor, which must not travel with the pickle
    clone = pickle.loads(pickle.dumps(src))
    assert [clone[i] for i in range(len(clone))] == expected[:3]


def test_jsonl_concurrent_reads(tmp_path):
    rng = random.Random(0)
    paths, expected = [], []
    for f in range(3):
        path = tmp_path / f"part{f}.jsonl"
        lines = [f"file {f} line {n} " + "x" * rng.randint(0, 300) for n in range(700)]
        path.write_text("".join(line + "\n" for line in lines))
        paths.append(path)
        expected += [(f"{path}:{n + 1}", (line + "\n").encode()) for n, line in enumerate(lines)]
    src = JsonlSource(paths)  # fresh: descriptors get opened lazily, from the threads
    order = [i for _ in range(4) for i in rng.sample(range(len(expected)), len(expected))]
    with ThreadPoolExecutor(max_workers=16) as pool:
        got = list(pool.map(src.__getitem__, order, chunksize=7))
    mismatches = [i for i, g in zip(order, got, strict=True) if g != expected[i]]
    assert not mismatches, f"{len(mismatches)} wrong reads, first index {mismatches[0]}"


def test_jsonl_missing_file_names_it(tmp_path, two_files):
    a, _, _ = two_files
    missing = tmp_path / "nope" / "train.jsonl"
    for spec in (missing, [a, missing]):
        with pytest.raises(FileNotFoundError, match=str(missing)):
            JsonlSource(spec)


def test_array_record_round_trip(tmp_path):
    lines = [f'{{"query": "q{i}", "positive": "p{i}"}}' for i in range(11)]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n")
    paths = prepare_array_record(jsonl, tmp_path / "ar" / "train", num_shards=4)
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        f"train-{i:05d}-of-00004.arrayrecord" for i in range(4)
    ]
    src = ArrayRecordSource(str(tmp_path / "ar" / "train-*.arrayrecord"))
    assert len(src) == len(lines)
    items = [src[i] for i in range(len(src))]
    assert [raw for _, raw in items] == [line.encode() for line in lines]
    # 11 records in 4 shards: 3, 3, 3, 2; labels name the shard and the index inside it.
    shard_of = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    within = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1]
    assert [where for where, _ in items] == [
        f"{paths[s]}#{k}" for s, k in zip(shard_of, within, strict=True)
    ]
    assert parse_record(items[7][1], items[7][0]).query == "q7"


def test_counted_source_counts_distinct_records_read(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "n.jsonl"
    path.write_text("".join(f"line {n}\n" for n in range(1003)) + "\n")
    src = CountedSource(JsonlSource(path))
    assert (len(src), src.name, src.total_lines, src.records_read) == (1003, str(path), 1004, 0)
    assert src[7] == (f"{path}:8", b"line 7\n")
    assert src.records_read == 1
    order = [rng.randrange(0, 1003, 3) for _ in range(5000)]  # repeats, from many threads
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(src.__getitem__, order, chunksize=7))
    assert src.records_read == len(set(order) | {7})


def test_array_record_more_shards_than_records(tmp_path):
    jsonl = tmp_path / "small.jsonl"
    jsonl.write_text("a\nb\nc\n")
    prepare_array_record(jsonl, tmp_path / "small", num_shards=4)
    src = ArrayRecordSource(str(tmp_path / "small-*"))
    assert [src[i][1] for i in range(len(src))] == [b"a", b"b", b"c"]


def test_array_record_missing_pattern(tmp_path):
    pattern = str(tmp_path / "none-*.arrayrecord")
    with pytest.raises(FileNotFoundError, match="none-"):
        ArrayRecordSource(pattern)


def test_open_source_dispatch(tmp_path, two_files):
    a, b, expected = two_files
    both = open_source(f"{a},{b}")
    assert isinstance(both, JsonlSource) and both.paths == [a, b]
    assert [both[i] for i in range(len(both))] == expected
    globbed = open_source(str(tmp_path / "*.jsonl"))
    assert isinstance(globbed, JsonlSource) and globbed.paths == [a, b]  # sorted
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        open_source(str(tmp_path / "missing.jsonl"))
    prepare_array_record(a, tmp_path / "ar" / "a", num_shards=2)
    ar = open_source(str(tmp_path / "ar" / "*.arrayrecord"))
    assert isinstance(ar, ArrayRecordSource)
    assert [ar[i][1] for i in range(len(ar))] == [raw.rstrip(b"\n") for _, raw in expected[:3]]


# ------------------------------------------------------------------ reading with the skip policy

GOOD = '{"query": "q%d", "positive": "p%d"}'


@pytest.fixture
def mixed(tmp_path):
    """Lines: good, bad JSON (2), blank (3), good, unknown field (5), good."""
    path = tmp_path / "mixed.jsonl"
    lines = [GOOD % (1, 1), "{nope", "", GOOD % (4, 4), '{"query": "q", "positive": "p", "x": 1}',
             GOOD % (6, 6)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def test_scan_records_strict_names_the_first_bad_line(mixed):
    with pytest.raises(BadLineError, match=rf"^{mixed}:2: not valid JSON"):
        scan_records(mixed)
    with pytest.raises(BadLineError, match=rf"^{mixed}:2: "):
        read_records(mixed)
    assert [r.query for r in read_records(mixed, limit=1)] == ["q1"]  # stops before line 2


def test_scan_records_skips_and_lists_bad_lines(mixed):
    records, skipped = scan_records(mixed, skip_bad_lines=True)
    assert [r.query for r in records] == ["q1", "q4", "q6"]
    assert len(skipped) == 2
    assert skipped[0].startswith(f"{mixed}:2: not valid JSON")
    assert skipped[1].startswith(f"{mixed}:5: unknown field(s) ['x']")
    # `limit` counts usable records; the spec may be a glob or an opened source.
    assert [r.query for r in read_records(mixed, 2, skip_bad_lines=True)] == ["q1", "q4"]
    assert scan_records(str(mixed.parent / "mix*.jsonl"), True)[0] == records
    assert scan_records(JsonlSource(mixed), True) == (records, skipped)


def test_data_without_a_usable_record_names_what_was_found(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{nope\n" * 4 + '{"query": ""}\n')
    with pytest.raises(DataError, match=rf"^{empty}: no usable record \(empty\)$"):
        scan_records(empty, skip_bad_lines=True)
    with pytest.raises(DataError, match=rf"^{blank}: no usable record \(3 lines, all blank\)$"):
        read_records(blank)
    with pytest.raises(DataError) as e:
        scan_records(bad, skip_bad_lines=True)
    assert str(e.value).startswith(
        f"{bad}: no usable record (5 lines, all skipped as bad; first: {bad}:1: not valid JSON"
    )
    assert not isinstance(e.value, BadLineError)
    with pytest.raises(BadLineError, match=rf"^{bad}:1: "):  # strict: the first bad line
        scan_records(bad)
    # Several files are named together.
    with pytest.raises(DataError, match=rf"^{empty}, {blank}: no usable record \(3 lines, all"):
        scan_records(f"{empty},{blank}")
