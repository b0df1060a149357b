"""Manual pages: query = the NAME line's description (`ls - list directory contents` -> `list
directory contents`), positive = the first paragraph(s) of DESCRIPTION as plain text, hard negatives
= other pages of the same section. Split by page name.

Pages are rendered with `man -l` (man-db runs the page's preprocessors and follows `.so`), or with
`groff -man -Tutf8` when `man` is missing, at a very wide line length so that a paragraph comes out
as one line. Only the English pages (`<man_dir>/man<section>/`), not `<man_dir>/<lang>/`.
"""

from __future__ import annotations

import gzip
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

from grc_jax.core.errors import MissingPathError, UsageError
from grc_jax.data.real_text.build import Candidate, Skip, Source
from grc_jax.data.real_text.text import drop_lead_in, squash

DEFAULT_MAN_DIR = "/usr/share/man"
DEFAULT_SECTIONS = ("1", "5", "7", "8")
LINE_WIDTH = 4000  # columns: wide enough that no paragraph wraps
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".lzma", ".zst")
_NAME_DASH = re.compile(r"\s+(?:\\?-{1,2}|[–—])\s+")
# groff puts .SS / .Ss headings at 3 columns, body text at 5 (mdoc) or 7 (man) columns.
_SUBHEADING_INDENT = 4
_TAGGED = re.compile(r"^\S+(?: \S+)?\s{3,}\S")  # "-c        If the -c option ...": a list tag


def page_name(path: Path) -> tuple[str, str]:
    """`ls.1.gz` -> (`ls`, `1`); `asn1parse.1ssl.gz` -> (`asn1parse`, `1ssl`)."""
    name = path.name
    for suffix in _COMPRESSIONS:
        name = name.removesuffix(suffix)
    stem, _, section = name.rpartition(".")
    return (stem, section) if stem else (name, "")


def family(name: str) -> str:
    """The command family of a page: `gcloud_compute_ssh` -> `gcloud`, `git-commit` -> `git`."""
    return re.split(r"[-_.]", name, maxsplit=1)[0] or name


def _read_head(path: Path, size: int = 4096) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:  # type: ignore[operator]
        return f.read(size)


def is_so_alias(path: Path) -> bool:
    """A page whose only request is `.so other/page` (an alias of another page). Pages we cannot
    read here (other compressions) count as real pages; the renderer decides."""
    if path.suffix in _COMPRESSIONS and path.suffix != ".gz":
        return False
    lines = [
        line.strip()
        for line in _read_head(path).decode("utf-8", "replace").splitlines()
        if line.strip() and not line.lstrip().startswith(('.\\"', '\\"', "'\\\""))
    ]
    return bool(lines) and lines[0].startswith(".so ") and len(lines) <= 2


def pick_renderer(renderer: str = "auto") -> str:
    """`man` or `groff`: the one asked for, or (auto) the first of them installed."""
    if renderer not in ("auto", "man", "groff"):
        raise UsageError(f"--renderer {renderer!r}: expected auto, man or groff")
    for name in ("man", "groff") if renderer == "auto" else (renderer,):
        if shutil.which(name):
            return name
    raise MissingPathError(
        f"man pages need `{renderer if renderer != 'auto' else 'man'}` to render them: "
        "apt-get install man-db groff-base"
    )


def render(path: Path, renderer: str, timeout: float = 60.0) -> str | None:
    """A page as plain UTF-8 text (no bold / underline), or None when rendering fails."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LC_ALL": "C.UTF-8",
        "LANG": "C.UTF-8",
        "MANWIDTH": str(LINE_WIDTH),
        "GROFF_NO_SGR": "1",
    }
    try:
        if renderer == "man":
            r = subprocess.run(
                ["man", "-l", str(path)], capture_output=True, env=env, timeout=timeout,
                cwd=path.parent.parent,  # `.so manN/page` resolves from the man root
            )  # fmt: skip
        else:
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            cmd = [
                "groff",
                "-man",
                "-t",
                "-k",
                "-Tutf8",
                "-P-cbou",
                f"-rLL={LINE_WIDTH}n",
                "-rHY=0",
            ]
            r = subprocess.run(cmd, input=data, capture_output=True, env=env, timeout=timeout,
                               cwd=path.parent.parent)  # fmt: skip
    except (subprocess.TimeoutExpired, OSError):
        return None
    text = r.stdout.decode("utf-8", "replace")
    if r.returncode != 0 or not text.strip():
        return None
    return re.sub(r".\x08", "", text)  # any overstrike left (bold / underline) dropped


def sections_of(text: str) -> dict[str, list[str]]:
    """Rendered page -> {heading: its lines}; headings are the lines at column 0."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.strip() and not line[0].isspace():
            current = line.strip()
            out.setdefault(current, [])
        elif current is not None:
            out[current].append(line.rstrip())
    return out


def name_description(lines: list[str]) -> str | None:
    """The NAME section's description: `ls - list directory contents` -> `list directory
    contents`."""
    text = " ".join(line.strip() for line in lines if line.strip())
    parts = _NAME_DASH.split(text, maxsplit=1)
    return parts[1].strip() if len(parts) == 2 and parts[1].strip() else None


def leading_paragraphs(lines: list[str]) -> list[str]:
    """The DESCRIPTION's leading prose paragraphs: those at the section's base indentation, up to
    the first indented block, tagged list item or example (without its cut-off lead-in).
    Subsection headings (`.SS`, `.Ss`: indented less than the body) only
    separate paragraphs."""
    blocks: list[list[str]] = []
    for line in lines:
        if not line.strip() or len(line) - len(line.lstrip()) <= _SUBHEADING_INDENT:
            if blocks and blocks[-1]:
                blocks.append([])
        else:
            if not blocks:
                blocks.append([])
            blocks[-1].append(line)
    blocks = [b for b in blocks if b]
    if not blocks:
        return []
    indent = len(blocks[0][0]) - len(blocks[0][0].lstrip())
    out = []
    for block in blocks:
        indents = {len(line) - len(line.lstrip()) for line in block}
        if indents != {indent} or _TAGGED.match(block[0].strip()):
            return drop_lead_in(out)  # stopped at a list or example: drop its cut-off lead-in
        out.append("\n".join(squash(line) for line in block))
    return out


def page_candidate(text: str, name: str, section: str) -> Candidate | Skip:
    """A rendered page -> its candidate record, or why it has none."""
    sections = sections_of(text)
    query = name_description(sections.get("NAME", []))
    if query is None:
        return Skip("no 'name - description' NAME line", name)
    paras = leading_paragraphs(sections.get("DESCRIPTION", []))
    if not paras:
        return Skip("no prose DESCRIPTION paragraph", name)
    return Candidate(query, "\n\n".join(paras), name, (section,), name)


def manpages_source(
    man_dir: str | Path = DEFAULT_MAN_DIR,
    sections: tuple[str, ...] = DEFAULT_SECTIONS,
    max_per_family: int = 200,
    seed: int = 0,
    renderer: str = "auto",
    workers: int | None = None,
) -> Source:
    """The man-page source: one unit per page file of `sections` under `man_dir`; symlinks and
    `.so` aliases are not pages of their own; at most `max_per_family` pages (seeded sample) of one
    command family (0: no cap), so that thousands of `gcloud_*` pages do not swamp the rest."""
    root = Path(man_dir)
    if not root.is_dir():
        raise MissingPathError(f"{root}: no such man directory")
    if max_per_family < 0:
        raise UsageError(f"--max-per-family {max_per_family}: expected a count >= 0 (0: no cap)")
    tool = pick_renderer(renderer)
    files: list[tuple[Path, str, str]] = []
    symlinks = 0
    missing = []
    for sec in sections:
        sec_dir = root / f"man{sec}"
        if not sec_dir.is_dir():
            missing.append(sec)
            continue
        for path in sorted(sec_dir.iterdir()):
            if path.is_symlink():
                symlinks += 1
            elif path.is_file():
                name, _ = page_name(path)
                files.append((path, name, sec))
    if missing and len(missing) == len(sections):
        raise MissingPathError(f"{root}: no man{'/man'.join(sections)} directories")
    by_family: dict[str, list[tuple[Path, str, str]]] = {}
    for f in files:
        by_family.setdefault(family(f[1]), []).append(f)
    capped: dict[str, int] = {}
    units = []
    for fam in sorted(by_family):
        pages = by_family[fam]
        if max_per_family and len(pages) > max_per_family:
            capped[fam] = len(pages) - max_per_family
            pages = sorted(random.Random(f"{seed}:{fam}").sample(pages, max_per_family))
        units += pages

    def expand(unit) -> list[Candidate | Skip]:
        path, name, sec = unit
        try:
            if is_so_alias(path):
                return [Skip("alias (.so) of another page", name)]
        except (OSError, EOFError):
            return [Skip("unreadable file", name)]
        text = render(path, tool)
        if text is None:
            return [Skip(f"{tool} failed to render", name)]
        return [page_candidate(text, name, sec)]

    extra = {
        "renderer": tool,
        "sections": list(sections),
        "missing_sections": missing,
        "page_files": len(files),
        "symlinks": symlinks,
        "capped_by_family": capped,
    }
    n_workers = workers or min(8, os.cpu_count() or 1)
    return Source("manpages", units, expand, workers=n_workers, found_extra=extra)
