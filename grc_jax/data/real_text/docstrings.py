"""Python docstrings of installed packages: query = a docstring's summary line (its first
sentence), positive = the rest of its narrative (up to the first Parameters / Args / Returns /
Examples section, doctest or directive), hard negatives = docstrings of siblings in the same
module. Split by module.

Import-free: packages are located with `importlib.util.find_spec` on their top-level name (which
runs none of their code) and their `.py` files parsed with `ast`. Private names (`_x`), dunders,
nested functions and test directories are skipped.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

from grc_jax.core.errors import MissingPathError, UsageError
from grc_jax.data.real_text.build import Candidate, Skip, Source
from grc_jax.data.real_text.text import drop_lead_in, paragraphs, sentences, squash, unwrap

DEFAULT_PACKAGES = (
    "numpy", "jax", "flax", "optax", "orbax", "grain", "transformers", "torch", "sentencepiece",
)  # fmt: skip
SKIP_DIRS = frozenset({"tests", "test", "testing", "__pycache__", "benchmarks", "examples"})
MAX_FILE_BYTES = 2_000_000

_SECTION = re.compile(
    r"^(args|arguments|parameters|params|other parameters|keyword args|keyword arguments|kwargs|"
    r"returns?|return type|yields?|raises|exceptions|examples?|example usage|usage|notes?|"
    r"see also|attributes|references|warnings?|todo|methods|inputs|outputs|shape|shapes|type)"
    r"\s*:{0,2}\s*$",
    re.IGNORECASE,
)
_FIELD = re.compile(
    r"^(:(param|parameter|arg|type|returns?|rtype|raises?|yields?|var)\b|>>>|\.\. )"
)
_UNDERLINE = re.compile(r"^\s*([-=~^*`])\1{2,}\s*$")
_ROLE = re.compile(r":[\w:.+-]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`__?")
_CODE = re.compile(r"``(.+?)``")
_TICK = re.compile(r"`([^`]+)`_{0,2}")
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")  # "f(x, y=1) -> z": a C function's first line
_MD_LINK = re.compile(r"\[~?([^\]\n]+)\](?:\([^)\s]*\))?")
_TAG = re.compile(r"</?[A-Za-z][\w-]*(?:\s+[\w-]+(?:=(?:\{[^}]*\}|\"[^\"]*\"|\S+))?)*\s*/?>")
_EMPH = re.compile(r"(?<![\w*])\*{1,2}(\S(?:.*?\S)?)\*{1,2}(?![\w*])")


def plain_markup(text: str) -> str:
    """reStructuredText / Markdown inline markup removed: `:func:`~a.b.c`` -> `a.b.c`,
    ` ``x`` ` -> `x`, `` `text <url>`_ `` -> `text`, `[text](url)` -> `text`, `[Name]` -> `Name`,
    `*x*` -> `x`; HTML-like tags (`<Tip>`) dropped."""
    text = _ROLE.sub(lambda m: m.group(1).strip(), text)
    text = _LINK.sub(r"\1", text)
    text = _CODE.sub(r"\1", text)
    text = _TICK.sub(r"\1", text)
    text = _MD_LINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    return squash(_EMPH.sub(r"\1", text))


def narrative(lines: list[str]) -> list[str]:
    """The leading lines before the first section header, field list, doctest or directive."""
    for i, line in enumerate(lines):
        stripped = line.strip()
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if _SECTION.match(stripped) or _FIELD.match(stripped):
            return lines[:i]
        if stripped and _UNDERLINE.match(nxt) and not _UNDERLINE.match(line):
            return lines[:i]  # a numpydoc / rst heading
    return lines


def split_docstring(doc: str) -> tuple[str, str]:
    """A cleaned docstring -> (summary line, narrative body): the first sentence of the first
    paragraph, and the rest (the body's paragraphs unwrapped, up to its first indented block: a
    literal block or example); markup removed."""
    blocks = paragraphs(doc)
    if not blocks:
        return "", ""
    first = blocks[0].splitlines()
    summary_lines = narrative(first)
    summary = plain_markup(" ".join(" ".join(summary_lines).split()))
    if len(summary_lines) < len(first):  # a section starts inside the summary paragraph
        return summary, ""
    rest = "\n".join(narrative(doc.strip()[len(blocks[0]) :].splitlines()))
    body_blocks = []
    for block in re.split(r"\n[ \t]*\n", rest):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        if lines[0][:1].isspace():  # indented: a literal block or example, not prose
            break
        text = plain_markup(unwrap(lines))
        if text:
            body_blocks.append(text)
    # What the narrative stopped at (an example, a math directive, Args) often has a lead-in.
    body_blocks = drop_lead_in(body_blocks)
    first_sentence, *more = sentences(summary) or [""]
    if more:  # a summary paragraph of several sentences: the first is the summary line
        body_blocks.insert(0, " ".join(more))
    body = "\n\n".join(body_blocks)
    return first_sentence, re.sub(r"::(?=\s|$)", ":", body)


def package_roots(packages: tuple[str, ...]) -> tuple[dict[str, list[Path]], list[str]]:
    """{package: its directories (or its one file)} for the installed ones, and the missing."""
    found: dict[str, list[Path]] = {}
    missing = []
    for name in packages:
        if not name.isidentifier():
            raise UsageError(f"--packages {name!r}: expected top-level package names (numpy,jax)")
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            missing.append(name)
        elif spec.submodule_search_locations:
            found[name] = [Path(p) for p in spec.submodule_search_locations]
        elif spec.origin and spec.origin.endswith(".py"):
            found[name] = [Path(spec.origin)]
        else:
            missing.append(name)  # an extension module: no source to read
    return found, missing


def module_files(package: str, roots: list[Path]) -> list[tuple[str, Path]]:
    """(dotted module name, file) of every `.py` file of the package, outside test directories."""
    out = []
    for root in roots:
        if root.is_file():
            out.append((package, root))
            continue
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if SKIP_DIRS & set(rel.parts[:-1]) or not all(p.isidentifier() for p in rel.parts[:-1]):
                continue
            parts = [package, *rel.parts[:-1]]
            if path.stem != "__init__":
                parts.append(path.stem)
            out.append((".".join(parts), path))
    return out


def docstrings_of(tree: ast.Module, module: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) of the module and its public classes, functions and methods."""
    out = []
    doc = ast.get_docstring(tree)
    if doc:
        out.append((module, doc))

    def visit(node, prefix: str, depth: int) -> None:
        for child in node.body:
            if not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            if child.name.startswith("_"):
                continue
            qualname = f"{prefix}.{child.name}"
            doc = ast.get_docstring(child)
            if doc:
                out.append((qualname, doc))
            if isinstance(child, ast.ClassDef) and depth == 0:
                visit(child, qualname, 1)

    visit(tree, module, 0)
    return out


def docstring_candidates(source_text: str, module: str, package: str) -> list[Candidate | Skip]:
    """Candidates of one module's source text."""
    try:
        tree = ast.parse(source_text)
    except (SyntaxError, ValueError):
        return [Skip("module does not parse", module)]
    out: list[Candidate | Skip] = []
    for qualname, doc in docstrings_of(tree, module):
        summary, body = split_docstring(doc)
        if not summary:
            out.append(Skip("no summary line", qualname))
        elif _SIGNATURE.match(summary):
            out.append(Skip("summary is a call signature", qualname))
        elif not body:
            out.append(Skip("no narrative body", qualname))
        else:
            out.append(Candidate(summary, body, module, (module, package), qualname))
    return out


def docstrings_source(packages: tuple[str, ...] = DEFAULT_PACKAGES) -> Source:
    """The docstring source: one unit per module file of the installed `packages`."""
    roots, missing = package_roots(packages)
    if not roots:
        raise MissingPathError(
            f"none of the packages {', '.join(packages)} is installed in this environment"
        )
    units = [(mod, path, pkg) for pkg in roots for mod, path in module_files(pkg, roots[pkg])]

    def expand(unit) -> list[Candidate | Skip]:
        module, path, package = unit
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                return [Skip("module file larger than 2 MB", module)]
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return [Skip("unreadable file", module)]
        return docstring_candidates(text, module, package)

    extra = {
        "packages": sorted(roots),
        "missing_packages": missing,
        "modules": {p: sum(u[2] == p for u in units) for p in sorted(roots)},
    }
    return Source("docstrings", units, expand, same_item_negatives=True, found_extra=extra)
