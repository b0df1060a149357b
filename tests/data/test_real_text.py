"""The real-text builders (`grc_jax/data/real_text/`): Debian descriptions, man pages and
docstrings from fixtures written here, then the shared rules (caps, dedupe, seeded output, splits
by source item, negatives from the same group and split) and `grc data debian|manpages|docstrings
|real`. One smoke test reads this machine's apt lists and man pages when they are there."""

import gzip
import hashlib
import importlib
import json
import shutil
import sys
from pathlib import Path

import lz4.frame
import pytest

from grc_jax.cli import main
from grc_jax.core.errors import MissingPathError, UsageError
from grc_jax.data.formats import read_beir
from grc_jax.data.real_text.build import BuildOptions, build_source, parse_fractions, split_of
from grc_jax.data.real_text.debian import APT_UPDATE, clean_long_description, debian_source
from grc_jax.data.real_text.docstrings import docstrings_source, split_docstring
from grc_jax.data.real_text.manpages import manpages_source, page_name
from grc_jax.data.real_text.text import cap_words, normalise
from grc_jax.data.schema import parse_record
from tests.data.conftest import read_jsonl

SPLITS = ("train", "validation", "test")
OPTS = BuildOptions(seed=0, fractions=(0.6, 0.2, 0.2))


def _split_files(out: Path) -> dict[str, bytes]:
    return {s: (out / f"{s}.jsonl").read_bytes() for s in SPLITS}


def _all(out: Path) -> dict[str, list[dict]]:
    recs = {s: read_jsonl(out / f"{s}.jsonl") for s in SPLITS}
    for s in SPLITS:
        for n, line in enumerate((out / f"{s}.jsonl").read_text().splitlines(), start=1):
            parse_record(line, f"{s}:{n}")
    return recs


# ---------------------------------------------------------------------------- text rules


def test_cap_words_cuts_at_paragraph_item_and_sentence_boundaries():
    text = "One two three. Four five six.\n\nSeven eight nine ten. Eleven twelve."
    assert cap_words(text, 100) == text
    assert cap_words(text, 6) == "One two three. Four five six."
    assert cap_words(text, 10) == "One two three. Four five six.\n\nSeven eight nine ten."
    assert cap_words(text, 5) == "One two three."
    assert cap_words(text, 2) is None  # not even the first sentence fits
    items = "Features:\n* alpha beta\n* gamma delta\n* epsilon zeta"
    assert cap_words(items, 5) == "Features:\n* alpha beta"
    # A paragraph that introduces a list which did not fit is dropped.
    assert cap_words("A whole sentence here.\n\nIt supports:\n\n* a b c d e f", 8) == (
        "A whole sentence here."
    )
    assert cap_words("Use e.g. the flag. Then stop.", 3) is None  # "e.g. the" is no sentence end


def test_normalise_ignores_case_punctuation_and_layout():
    assert (
        normalise("Hello,  World!\n* item") == normalise("hello world item") == "hello world item"
    )


def test_fractions_and_options_are_checked():
    assert parse_fractions("0.8,0.1,0.1") == (0.8, 0.1, 0.1)
    for bad in ("0.8,0.1", "a,b,c"):
        with pytest.raises(UsageError, match="--fractions"):
            parse_fractions(bad)
    with pytest.raises(UsageError, match="sum to 1"):
        BuildOptions(fractions=(0.5, 0.1, 0.1))
    with pytest.raises(UsageError, match="--negatives"):
        BuildOptions(negatives=-1)
    with pytest.raises(UsageError, match="--limit"):
        BuildOptions(limit=0)


def test_split_of_depends_only_on_seed_and_item():
    splits = [split_of(f"item{i}", 0, (0.6, 0.2, 0.2)) for i in range(2000)]
    assert splits == [split_of(f"item{i}", 0, (0.6, 0.2, 0.2)) for i in range(2000)]
    share = {s: splits.count(s) / len(splits) for s in SPLITS}
    assert abs(share["train"] - 0.6) < 0.05 and abs(share["test"] - 0.2) < 0.05
    assert splits != [split_of(f"item{i}", 1, (0.6, 0.2, 0.2)) for i in range(2000)]
    assert {split_of(f"item{i}", 0, (1.0, 0.0, 0.0)) for i in range(100)} == {"train"}


# ---------------------------------------------------------------------------- Debian

SECTIONS = ("utils", "libs", "games")


def _long(i: int) -> str:
    return (
        f" Tool number {i} does task {i} for the user with great care. It reads"
        f" files of kind k{i} and writes results.\n .\n It is number {i} of many."
    )


def _debian_fixture(root: Path, translations: bool = True) -> dict[str, dict]:
    """apt lists in `root`: 30 ordinary sources (one binary package each, three sections) plus the
    special cases; returns package -> {source, section, long} for the checks."""
    packages, trans, truth = [], [], {}

    def add(pkg, source, section, synopsis, long, md5=None, version_in_source=False):
        md5 = md5 or hashlib.md5(f"{synopsis}\n{long}".encode()).hexdigest()
        src = f"Source: {source} (1.0-1)\n" if version_in_source else f"Source: {source}\n"
        packages.append(
            f"Package: {pkg}\n{src if source != pkg else ''}Version: 1.0\n"
            f"Description: {synopsis}\nDescription-md5: {md5}\nSection: {section}\n"
            "Tag: role::program,\n use::doing\n"
        )
        if long is not None:
            trans.append(f"Package: {pkg}\nDescription-md5: {md5}\nDescription-en: {synopsis}\n"
                         + (long + "\n" if long else ""))  # fmt: skip
        truth[pkg] = {"source": source, "section": section, "long": long}

    for i in range(30):
        add(f"tool{i}", f"tool{i}", SECTIONS[i % 3], f"synopsis of tool {i}", _long(i))
    # One source, three binaries: -dev and -doc repeat the library's text (deduplicated).
    lib = " The foo library parses foo files quickly and safely in all cases.\n It is small."
    add("libfoo1", "foo", "libs", "foo library", lib, version_in_source=True)
    add("libfoo-dev", "foo", "libdevel", "foo library (development files)", lib)
    add("libfoo-doc", "foo", "doc", "foo library (documentation)", lib)
    add("foo-utils", "foo", "utils", "tools for foo files", _long(99))
    # Control-file format: paragraphs, a list with a wrapped item, verbatim lines.
    fancy = (
        " Fancy does several things for many people in a careful way:\n"
        " .\n"
        "  * reads the first kind of input\n"
        "    and the second kind\n"
        "  * writes output\n"
        " .\n"
        " Fancy is fast."
    )
    add("fancy", "fancy", "utils", "does several things", fancy)
    add("empty", "empty", "utils", "nothing more to say", "")
    add("lost", "lost", "utils", "no translation", None, md5="0" * 32)
    (root / "x_Packages.lz4").write_bytes(lz4.frame.compress("\n".join(packages).encode()))
    if translations:
        (root / "x_i18n_Translation-en.lz4").write_bytes(
            lz4.frame.compress("\n".join(trans).encode())
        )
    return truth


@pytest.fixture
def apt_lists(tmp_path):
    root = tmp_path / "lists"
    root.mkdir()
    return root, _debian_fixture(root)


def test_clean_long_description_undoes_the_control_file_format():
    lines = [" First line", " wraps here.", " .", "  * item one", "    continued", "  * item two",
             " .", " Last."]  # fmt: skip
    assert clean_long_description(lines) == (
        "First line wraps here.\n\n* item one continued\n* item two\n\nLast."
    )


def test_debian_records_dedupe_and_skips(apt_lists, tmp_path):
    root, truth = apt_lists
    stats = build_source(lambda: debian_source(root), OPTS, tmp_path / "out")
    recs = _all(tmp_path / "out")
    flat = [r for s in SPLITS for r in recs[s]]
    by_query = {r["query"]: r for r in flat}
    assert by_query["synopsis of tool 3"]["positive"] == (
        "Tool number 3 does task 3 for the user with great care. It reads files of kind k3 and "
        "writes results.\n\nIt is number 3 of many."
    )
    assert by_query["does several things"]["positive"] == (
        "Fancy does several things for many people in a careful way:\n\n"
        "* reads the first kind of input and the second kind\n* writes output\n\nFancy is fast."
    )
    # libfoo1 (the shortest binary of source foo) keeps the shared text; -dev and -doc are dropped.
    assert "foo library" in by_query
    assert not {"foo library (development files)", "foo library (documentation)"} & set(by_query)
    assert stats["deduplicated"] == {"duplicate positive": 2}
    assert stats["skipped"] == {
        "empty long description": 1,
        "no English description (Description-md5 not in Translation-en)": 1,
    }
    assert stats["found"] == len(truth) and stats["packages"] == len(truth)
    assert sum(stats["written"].values()) == len(flat) == 33  # 30 tools, libfoo1, foo-utils, fancy
    assert stats["units"] == 30 + 4  # sources: tool0..29, foo, fancy, empty, lost


def test_debian_splits_by_source_and_negatives_from_same_section_and_split(apt_lists, tmp_path):
    root, truth = apt_lists
    build_source(lambda: debian_source(root), OPTS, tmp_path / "out")
    recs = _all(tmp_path / "out")
    text_info: dict[str, dict] = {}
    for v in truth.values():  # the first package of a text is the one kept (libfoo1)
        if v["long"]:
            text_info.setdefault(clean_long_description(v["long"].split("\n")), v)
    sources = {s: {text_info[r["positive"]]["source"] for r in recs[s]} for s in SPLITS}
    assert not (sources["train"] & sources["validation"] or sources["train"] & sources["test"]
                or sources["validation"] & sources["test"])  # fmt: skip
    # The two records of source foo (libfoo1, foo-utils) landed in one split.
    assert sum("foo" in sources[s] for s in SPLITS) == 1
    for split in SPLITS:
        positives = {r["positive"] for r in recs[split]}
        for r in recs[split]:
            info = text_info[r["positive"]]
            others = [
                x for x in recs[split] if text_info[x["positive"]]["source"] != info["source"]
            ]
            assert len(r.get("negatives", [])) == min(3, len(others))
            same_section = [x for x in recs[split] if x is not r
                            and text_info[x["positive"]]["section"] == info["section"]
                            and text_info[x["positive"]]["source"] != info["source"]]  # fmt: skip
            for neg in r.get("negatives", []):
                assert neg in positives and neg != r["positive"]
                assert text_info[neg]["source"] != info["source"]
            if len(same_section) >= 3:
                assert all(text_info[n]["section"] == info["section"] for n in r["negatives"])


def test_debian_output_is_deterministic_for_a_seed(apt_lists, tmp_path):
    root, _ = apt_lists
    build_source(lambda: debian_source(root), OPTS, tmp_path / "a")
    build_source(lambda: debian_source(root), OPTS, tmp_path / "b")
    other = BuildOptions(seed=1, fractions=(0.6, 0.2, 0.2))
    build_source(lambda: debian_source(root), other, tmp_path / "c")
    assert _split_files(tmp_path / "a") == _split_files(tmp_path / "b")
    assert _split_files(tmp_path / "a") != _split_files(tmp_path / "c")
    for split in ("validation", "test"):
        a = (tmp_path / "a" / f"{split}_beir" / "corpus.jsonl").read_bytes()
        assert a == (tmp_path / "b" / f"{split}_beir" / "corpus.jsonl").read_bytes()


def test_debian_limit_and_caps(apt_lists, tmp_path):
    root, _ = apt_lists
    opts = BuildOptions(seed=0, limit=5, max_words=12, min_words=3, negatives=1)
    stats = build_source(lambda: debian_source(root), opts, tmp_path / "out")
    flat = [r for recs in _all(tmp_path / "out").values() for r in recs]
    assert len(flat) == 5 == sum(stats["written"].values())
    assert stats["units_read"] < stats["units"]  # stopped early
    assert all(len(r["positive"].split()) <= 12 for r in flat)
    assert all(len(r.get("negatives", [])) <= 1 for r in flat)


def test_debian_beir_dirs_hold_the_held_out_splits(apt_lists, tmp_path):
    root, _ = apt_lists
    build_source(lambda: debian_source(root), OPTS, tmp_path / "out")
    for split in ("validation", "test"):
        recs = read_jsonl(tmp_path / "out" / f"{split}.jsonl")
        corpus, queries, qrels = read_beir(tmp_path / "out" / f"{split}_beir", split)
        assert sorted(queries.values()) == sorted(r["query"] for r in recs)
        assert {corpus[d] for q in qrels for d in qrels[q]} == {r["positive"] for r in recs}
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["source"] == "debian" and "written" in stats


def test_debian_errors_name_the_apt_command(tmp_path, capsys):
    root = tmp_path / "lists"
    root.mkdir()
    _debian_fixture(root, translations=False)
    with pytest.raises(MissingPathError, match="Translation-en") as info:
        debian_source(root)
    assert f"`{APT_UPDATE}`" in str(info.value)
    assert APT_UPDATE == "apt-get update -o Acquire::Languages=en"
    capsys.readouterr()
    assert main(["data", "debian", "--lists-dir", str(root), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("grc data: error: ") and APT_UPDATE in err[0]
    with pytest.raises(MissingPathError, match="apt-get update"):
        debian_source(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingPathError, match="Packages"):
        debian_source(tmp_path / "empty")


def test_plain_and_gzip_lists_are_read_too(apt_lists, tmp_path):
    root, truth = apt_lists
    for path in list(root.iterdir()):
        data = lz4.frame.decompress(path.read_bytes())
        stem = path.name.removesuffix(".lz4")
        if "Packages" in stem:
            (root / stem).write_bytes(data)
        else:
            (root / (stem + ".gz")).write_bytes(gzip.compress(data))
        path.unlink()
    stats = build_source(lambda: debian_source(root), OPTS, tmp_path / "out")
    assert sum(stats["written"].values()) == 33


# ---------------------------------------------------------------------------- man pages


def _page(name: str, desc: str, body: str, section: str = "1") -> str:
    return (f'.\\" a comment\n.TH {name.upper()} {section} "2024" "fixture" "User Commands"\n'
            f".SH NAME\n{name} \\- {desc}\n.SH SYNOPSIS\n.B {name}\n[\\fIOPTION\\fR]\n"
            f".SH DESCRIPTION\n{body}\n.SH SEE ALSO\nnothing\n")  # fmt: skip


MAN_BODY = (
    ".B {name}\nreads \\fBfiles\\fR of kind {i} and writes them back to the standard output\n"
    "in order. It stops at the end.\n.PP\nIt also counts lines of kind {i} when asked.\n"
    ".TP\n\\fB\\-a\\fR\nan option that must not be in the positive\n"
)


def _man_fixture(root: Path) -> None:
    for sec, names in (("1", [f"cmd{i}" for i in range(8)] + ["gcl_a", "gcl_b", "gcl_c"]),
                       ("8", ["admin0", "admin1"])):  # fmt: skip
        d = root / f"man{sec}"
        d.mkdir(parents=True)
        for name in names:
            page = _page(name, f"do thing number {name}", MAN_BODY.format(name=name, i=name), sec)
            (d / f"{name}.{sec}.gz").write_bytes(gzip.compress(page.encode()))
    m1 = root / "man1"
    (m1 / "alias.1.gz").write_bytes(gzip.compress(b".so man1/cmd0.1\n"))
    (m1 / "link.1.gz").symlink_to(m1 / "cmd1.1.gz")
    (m1 / "noname.1.gz").write_bytes(gzip.compress(b".TH X 1\n.SH NAME\nnoname\n.SH DESCRIPTION\n"
                                                   b"Some words here.\n"))  # fmt: skip
    (m1 / "listonly.1.gz").write_bytes(gzip.compress(_page(
        "listonly", "only options", ".TP\n\\fB\\-x\\fR\nan option\n").encode()))  # fmt: skip
    de = root / "de" / "man1"
    de.mkdir(parents=True)
    (de / "cmd0.1.gz").write_bytes(gzip.compress(_page("cmd0", "auf Deutsch", "Text.").encode()))


RENDERERS = [
    pytest.param(r, marks=pytest.mark.skipif(shutil.which(r) is None, reason=f"no {r} here"))
    for r in ("man", "groff")
]


@pytest.mark.parametrize("renderer", RENDERERS)
def test_manpages_records(renderer, tmp_path):
    _man_fixture(tmp_path / "man")
    make = lambda: manpages_source(tmp_path / "man", ("1", "8"), max_per_family=2, seed=0,  # noqa: E731
                                   renderer=renderer, workers=2)  # fmt: skip
    stats = build_source(make, OPTS, tmp_path / "out")
    recs = _all(tmp_path / "out")
    flat = {r["query"]: r for s in SPLITS for r in recs[s]}
    assert flat["do thing number cmd3"]["positive"] == (
        "cmd3 reads files of kind cmd3 and writes them back to the standard output in order. "
        "It stops at the end.\n\nIt also counts lines of kind cmd3 when asked."
    )
    assert not any("auf Deutsch" in q for q in flat)  # only the English pages
    assert stats["renderer"] == renderer and stats["symlinks"] == 1
    assert stats["capped_by_family"] == {"gcl": 1}
    assert stats["skipped"] == {
        "alias (.so) of another page": 1,
        "no 'name - description' NAME line": 1,
        "no prose DESCRIPTION paragraph": 1,
    }
    assert len(flat) == 8 + 2 + 2 == sum(stats["written"].values())
    # Negatives are pages of the same section (man8 has two pages: each other's only negative).
    sec = {r["positive"]: ("8" if "admin" in r["query"] else "1") for r in flat.values()}
    for split in SPLITS:
        for r in recs[split]:
            pool = [x for x in recs[split] if sec[x["positive"]] == sec[r["positive"]]]
            negs = r.get("negatives", [])
            assert all(n in {x["positive"] for x in recs[split]} for n in negs)
            if len(pool) > 3:
                assert all(sec[n] == sec[r["positive"]] for n in negs)


def test_man_page_names():
    assert page_name(Path("ls.1.gz")) == ("ls", "1")
    assert page_name(Path("asn1parse.1ssl.gz")) == ("asn1parse", "1ssl")
    assert page_name(Path("x.y.8")) == ("x.y", "8")


def test_manpages_errors(tmp_path):
    with pytest.raises(MissingPathError, match="no such man directory"):
        manpages_source(tmp_path / "nowhere")
    (tmp_path / "man").mkdir()
    with pytest.raises(MissingPathError, match="man1"):
        manpages_source(tmp_path / "man", ("1",))
    with pytest.raises(UsageError, match="--renderer"):
        manpages_source(tmp_path / "man", ("1",), renderer="troff")


# ---------------------------------------------------------------------------- docstrings

MODULE_A = '''"""Helpers for reading demo files of several kinds.

This module reads demo files and turns them into rows that other modules of the
demo package consume without any further checks.
"""


def read_rows(path):
    """Read the rows of a demo file.

    The file is opened in text mode and each line becomes one row; blank lines are
    skipped so that the caller never sees an empty row.

    Parameters
    ----------
    path : str
        where the file is.
    """


def write_rows(rows, path):
    """Write rows to a demo file.

    Every row is written on its own line, in the order given, with a trailing newline
    after the last row as well.

    Args:
        rows: the rows.
    """


def sig(a, b):
    """sig(a, b) -> int

    The first line of a C function's docstring is its call signature, not a summary.
    """


def no_body():
    """Only a summary line."""


def _private():
    """Private helper that must not be read.

    It has a long enough body to count, if private names were read at all.
    """


class Table:
    """A table of demo rows kept in memory.

    The table keeps the rows in a list and offers :func:`read_rows`-like access by
    index, with ``len(table)`` giving the number of rows stored.
    """

    def lookup(self, key):
        """Look a row up by its key.

        The search is linear in the number of rows, which is fine for the small
        tables that the demo package builds.
        """

    def __len__(self):
        """Number of rows.

        This dunder is skipped although its body is long enough to be read.
        """
'''


MODULE_B = '''"""Colour conversions between the usual spaces.

Hue, saturation and value are derived from red, green and blue channels with the
classic formulas, rounded to three decimals.
"""


def to_hsv(rgb):
    """Convert an RGB triple to HSV.

    Channels outside the unit interval are clipped first, so a bright pixel never
    produces a hue that wraps around.
    """


def to_grey(rgb):
    """Convert an RGB triple to a single grey level.

    The weights follow the broadcast standard that gives green the largest share
    and blue the smallest.
    """
'''


@pytest.fixture
def demo_package(tmp_path, monkeypatch):
    root = tmp_path / "site"
    pkg = root / "grcdemo_pkg"
    (pkg / "tests").mkdir(parents=True)
    (pkg / "__init__.py").write_text('raise RuntimeError("the builder must not import me")\n')
    (pkg / "alpha.py").write_text(MODULE_A)
    (pkg / "beta.py").write_text(MODULE_B)
    (pkg / "broken.py").write_text("def f(:\n")
    (pkg / "tests" / "test_alpha.py").write_text(MODULE_A.replace("demo", "test"))
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yield "grcdemo_pkg"
    assert "grcdemo_pkg" not in sys.modules


def test_split_docstring_keeps_the_narrative():
    summary, body = split_docstring(
        "Sum of `x` along an axis.\n\nUses :func:`~jax.numpy.add` with ``keepdims``.\n"
        "See the [guide](https://x.y) for details::\n\n    code()\n\nArgs:\n  x: input"
    )
    assert summary == "Sum of x along an axis."
    assert body == "Uses jax.numpy.add with keepdims."  # the example's lead-in is dropped
    assert split_docstring("Short.\nArgs:\n  x: y") == ("Short.", "")
    assert split_docstring("Poisson.\n\nSamples have a pmf given by\n\n.. math::\n\n  p(k)") == (
        "Poisson.",
        "",
    )
    assert split_docstring("First sentence here. Second one\nwraps.\n\nBody text.") == (
        "First sentence here.",
        "Second one wraps.\n\nBody text.",
    )


def test_docstring_records(demo_package, tmp_path):
    opts = BuildOptions(seed=0, fractions=(0.5, 0.25, 0.25), negatives=2)
    stats = build_source(lambda: docstrings_source((demo_package, "no_such_pkg_x")), opts,
                         tmp_path / "out")  # fmt: skip
    recs = _all(tmp_path / "out")
    flat = {r["query"]: r for s in SPLITS for r in recs[s]}
    assert flat["Read the rows of a demo file."]["positive"] == (
        "The file is opened in text mode and each line becomes one row; blank lines are skipped "
        "so that the caller never sees an empty row."
    )
    assert flat["A table of demo rows kept in memory."]["positive"].startswith(
        "The table keeps the rows in a list and offers read_rows-like access by index, with "
        "len(table) giving"
    )
    assert "Look a row up by its key." in flat
    assert not any("Private" in q or "Number of rows" in q or "test" in q for q in flat)
    assert stats["missing_packages"] == ["no_such_pkg_x"]
    assert stats["modules"] == {demo_package: 4}  # __init__, alpha, beta, broken; not tests/
    assert stats["skipped"] == {
        "module does not parse": 1,
        "no narrative body": 1,
        "summary is a call signature": 1,
    }
    assert len(flat) == 5 + 3
    # Split by module; negatives are the module's siblings.
    module_of = {r["positive"]: ("beta" if "RGB" in r["query"] or "Colour" in r["query"]
                                 else "alpha") for r in flat.values()}  # fmt: skip
    splits_of = {m: {s for s in SPLITS for r in recs[s] if module_of[r["positive"]] == m}
                 for m in ("alpha", "beta")}  # fmt: skip
    assert all(len(v) == 1 for v in splits_of.values())
    for split in SPLITS:
        for r in recs[split]:
            assert len(r["negatives"]) == 2
            assert {module_of[n] for n in r["negatives"]} == {module_of[r["positive"]]}


def test_docstrings_need_an_installed_package(tmp_path):
    with pytest.raises(MissingPathError, match="none of the packages"):
        docstrings_source(("no_such_pkg_x",))
    with pytest.raises(UsageError, match="top-level"):
        docstrings_source(("jax.numpy",))


# ---------------------------------------------------------------------------- the CLI


def test_grc_data_real_builds_and_merges(apt_lists, demo_package, tmp_path, capsys):
    root, _ = apt_lists
    _man_fixture(tmp_path / "man")
    out = tmp_path / "real"
    renderer = "groff" if shutil.which("groff") else "auto"  # groff: faster than man -l
    args = ["data", "real", "--out", str(out), "--lists-dir", str(root), "--man-dir",
            str(tmp_path / "man"), "--sections", "1,8", "--packages", demo_package,
            "--fractions", "0.6,0.2,0.2", "--renderer", renderer]  # fmt: skip
    if not (shutil.which("man") or shutil.which("groff")):
        pytest.skip("no man or groff here")
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "debian:" in printed and "manpages:" in printed and "docstrings:" in printed
    assert "merged into" in printed and "total" in printed
    stats = json.loads((out / "stats.json").read_text())
    for split in SPLITS:
        merged = read_jsonl(out / f"{split}.jsonl")
        parts = [r for name in ("debian", "docstrings", "manpages")
                 for r in read_jsonl(out / name / f"{split}.jsonl")]  # fmt: skip
        key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
        assert sorted(map(key, merged)) == sorted(map(key, parts))
        assert stats["sources"][split] == {
            n: len(read_jsonl(out / n / f"{split}.jsonl"))
            for n in ("debian", "docstrings", "manpages")
        }
        if split != "train":
            assert (out / f"{split}_beir" / "qrels" / f"{split}.tsv").is_file()
    first = _split_files(out)
    assert main(args) == 0
    assert _split_files(out) == first


def test_grc_data_bad_flags_are_one_line(apt_lists, tmp_path, capsys):
    root, _ = apt_lists
    capsys.readouterr()
    rc = main(["data", "debian", "--lists-dir", str(root), "--out", str(tmp_path / "o"),
               "--fractions", "0.9,0.2,0.1"])  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and "--fractions" in err[0] and "sum to 1" in err[0]
    assert main(["data", "manpages", "--man-dir", str(tmp_path / "nope"), "--out", "x"]) == 2
    assert "no such man directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------- this machine

LISTS = Path("/var/lib/apt/lists")


@pytest.mark.skipif(
    not list(LISTS.glob("*_i18n_Translation-en*")) or not Path("/usr/share/man/man1").is_dir()
    or not (shutil.which("man") or shutil.which("groff")),
    reason="no apt Translation-en lists or man pages on this machine",
)  # fmt: skip
def test_smoke_on_this_machine(tmp_path):
    opts = BuildOptions(seed=0, limit=20)
    stats = build_source(lambda: debian_source(LISTS), opts, tmp_path / "debian")
    assert sum(stats["written"].values()) == 20 and stats["packages"] > 1000
    stats = build_source(lambda: manpages_source(sections=("1",)), BuildOptions(limit=5),
                         tmp_path / "man")  # fmt: skip
    assert sum(stats["written"].values()) == 5
    for name in ("debian", "man"):
        _all(tmp_path / name)
