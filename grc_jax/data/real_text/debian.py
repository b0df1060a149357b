"""Debian package descriptions from apt's lists: query = the one-line synopsis, positive = the long
description, hard negatives = packages of the same Section. Split by Source package.

Reads `<lists>/*_Packages[.lz4|.gz|.xz]` (Package, Source, Section, Description = synopsis,
Description-md5) and `<lists>/*_i18n_Translation-en[...]` (Description-md5 -> Description-en =
synopsis + long description), both deb822 paragraphs. The long description is in Debian's
control-file format (Policy 5.6.13): continuation lines start with a space, ` .` is a blank line,
lines indented further are shown verbatim (lists).
"""

from __future__ import annotations

import gzip
import io
import lzma
from collections.abc import Iterable, Iterator
from pathlib import Path

import lz4.frame

from grc_jax.core.errors import MissingPathError
from grc_jax.data.real_text.build import Candidate, Skip, Source
from grc_jax.data.real_text.text import BULLET

APT_UPDATE = "apt-get update -o Acquire::Languages=en"
DEFAULT_LISTS = "/var/lib/apt/lists"
_SUFFIXES = ("", ".lz4", ".gz", ".xz")


def open_list(path: Path) -> io.TextIOBase:
    """An apt list file as text, decompressed by its suffix (.lz4, .gz, .xz or none)."""
    opener = {".lz4": lz4.frame.open, ".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8", errors="replace")  # type: ignore[operator]


def list_files(lists_dir: Path, kind: str) -> list[Path]:
    """apt list files `*_<kind>` with any of the compressions, sorted."""
    return sorted(p for s in _SUFFIXES for p in lists_dir.glob(f"*_{kind}{s}") if p.is_file())


def deb822(lines: Iterable[str], wanted: frozenset[str]) -> Iterator[dict[str, str]]:
    """The `wanted` fields of each deb822 paragraph; a field's continuation lines are kept raw
    (leading space included) after a newline."""
    rec: dict[str, str] = {}
    key: str | None = None
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if rec:
                yield rec
            rec, key = {}, None
        elif line[0] in " \t":
            if key is not None:
                rec[key] += "\n" + line
        else:
            name, _, value = line.partition(":")
            key = name if name in wanted else None
            if key is not None:
                rec[key] = value.strip()
    if rec:
        yield rec


def clean_long_description(lines: list[str]) -> str:
    """Undo the control-file format: wrapped lines joined, ` .` a paragraph break, list items one
    per line (a list item's wrapped continuation lines joined to it)."""
    paragraphs: list[list[str]] = [[]]
    in_item = False
    for raw in lines:
        text = raw.strip()
        if text in (".", ""):
            if paragraphs[-1]:
                paragraphs.append([])
            in_item = False
            continue
        verbatim = raw.startswith(("  ", " \t"))
        para = paragraphs[-1]
        if BULLET.match(text) or not para:
            para.append(text)
            in_item = bool(BULLET.match(text))
        elif verbatim and not in_item:
            para.append(text)
        else:
            para[-1] += " " + text
    return "\n\n".join("\n".join(p) for p in paragraphs if p)


def _translations(files: list[Path]) -> dict[str, str]:
    """Description-md5 -> Description-en (synopsis line, then the raw long-description lines)."""
    out: dict[str, str] = {}
    wanted = frozenset({"Description-md5", "Description-en"})
    for path in files:
        with open_list(path) as f:
            for rec in deb822(f, wanted):
                if "Description-md5" in rec and "Description-en" in rec:
                    out.setdefault(rec["Description-md5"], rec["Description-en"])
    return out


def _packages(files: list[Path]) -> dict[str, dict[str, str]]:
    """Package name -> its fields, first occurrence in sorted file order."""
    out: dict[str, dict[str, str]] = {}
    wanted = frozenset({"Package", "Source", "Section", "Description", "Description-md5"})
    for path in files:
        with open_list(path) as f:
            for rec in deb822(f, wanted):
                if "Package" in rec:
                    out.setdefault(rec["Package"], rec)
    return out


def debian_source(lists_dir: str | Path = DEFAULT_LISTS) -> Source:
    """The Debian source: one unit per Source package, holding its binary packages (the package
    named like its source first, then shorter names: dedupe keeps the first of equal texts)."""
    root = Path(lists_dir)
    if not root.is_dir():
        raise MissingPathError(
            f"{root}: no such directory (apt's package lists); run `{APT_UPDATE}`"
        )
    package_files = list_files(root, "Packages")
    if not package_files:
        raise MissingPathError(f"{root}: no *_Packages files; run `{APT_UPDATE}`")
    translation_files = list_files(root, "i18n_Translation-en")
    if not translation_files:
        raise MissingPathError(
            f"{root}: no *_i18n_Translation-en files (the English long descriptions); "
            f"run `{APT_UPDATE}`"
        )
    packages = _packages(package_files)
    translations = _translations(translation_files)

    by_source: dict[str, list[dict[str, str]]] = {}
    for name, rec in packages.items():
        source = (rec.get("Source") or name).split()[0]
        by_source.setdefault(source, []).append(rec)
    units = []
    for source in sorted(by_source):
        recs = sorted(by_source[source], key=lambda r: (r["Package"] != source, len(r["Package"]),
                                                        r["Package"]))  # fmt: skip
        units.append((source, recs))

    def expand(unit) -> list[Candidate | Skip]:
        source, recs = unit
        out: list[Candidate | Skip] = []
        for rec in recs:
            name = rec["Package"]
            full = rec.get("Description", "")
            if "\n" not in full:  # the usual case: the long text is in Translation-en
                full = translations.get(rec.get("Description-md5", ""), "")
                if not full:
                    out.append(Skip("no English description (Description-md5 not in "
                                    "Translation-en)", name))  # fmt: skip
                    continue
            synopsis, *long_lines = full.split("\n")
            positive = clean_long_description(long_lines)
            if not positive:
                out.append(Skip("empty long description", name))
                continue
            section = rec.get("Section", "unknown").rsplit("/", 1)[-1]
            out.append(Candidate(synopsis.strip(), positive, source, (section,), name))
        return out

    extra = {
        "packages": len(packages),
        "package_files": [p.name for p in package_files],
        "translation_files": [p.name for p in translation_files],
    }
    return Source("debian", units, expand, same_item_negatives=False, found_extra=extra)
