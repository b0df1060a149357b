"""The package's imports flow one way: core -> model -> data -> checkpoints -> train | infer ->
convert | eval -> cli (docs/architecture.md). Walks every module's AST, so a violation is named by
file:line before anything runs."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "grc_jax"

# Rank of each top-level part of grc_jax; a module may import only its own rank or lower.
# train and infer share a rank but must not import each other; so do convert and eval.
LAYERS = {
    "__init__": 0, "core": 0, "model": 1, "data": 2, "checkpoints": 3, "integrity": 3, "adapter": 3,
    "train": 4,
    "infer": 4,
    "convert": 5, "eval": 5, "serve": 6, "cli": 7,
}  # fmt: skip
SIBLINGS = {("train", "infer"), ("infer", "train"), ("convert", "eval"), ("eval", "convert")}


def _part(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "grc_jax", module
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts)


def _imports(path: Path):
    """(line, imported grc_jax module, inside a function) for every import of grc_jax."""
    tree = ast.parse(path.read_text(), str(path))
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if inner is not node:
                    in_function.add(id(inner))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "grc_jax":
                names = [f"grc_jax.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "grc_jax" or name.startswith("grc_jax."):
                yield node.lineno, name, id(node) in in_function


def _violations():
    upward, lazy = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _part(_module_name(path)) if path.name != "__init__.py" or path.parent != PACKAGE \
            else "__init__"  # fmt: skip
        for line, name, in_function in _imports(path):
            there = _part(name)
            where = f"{path.relative_to(ROOT)}:{line}"
            if LAYERS[there] > LAYERS[here] or (here, there) in SIBLINGS:
                upward.append(f"{where}: {here} imports {name} ({there} is not below {here})")
            if in_function and here != "cli":
                lazy.append(f"{where}: function-level import of {name}")
    return upward, lazy


def test_every_part_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    parts = modules | packages
    assert parts <= set(LAYERS), f"give these a layer in LAYERS: {sorted(parts - set(LAYERS))}"


def test_imports_flow_one_way():
    upward, _ = _violations()
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_function_level_imports_of_grc_jax_outside_the_cli():
    # The CLI defers its imports so that `grc --help` starts fast; elsewhere a function-level
    # import of our own code would be a circle being dodged.
    _, lazy = _violations()
    assert not lazy, "\n".join(lazy)


def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "grc_jax"
    (fake / "model").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "model" / "__init__.py").write_text("")
    (fake / "model" / "bad.py").write_text("import os\n\nfrom grc_jax.train.loop import train\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    upward, _ = _violations()
    assert upward == [
        "grc_jax/model/bad.py:3: model imports grc_jax.train.loop (train is not below model)"
    ]


def test_pallas_kernels_import_without_grc_jax():
    code = (
        "import sys; sys.modules['grc_jax'] = None\n"  # any import of grc_jax now fails
        "import pallas_kernels.hybrid_paged_attention as h\n"
        "from pallas_kernels.hybrid_paged_attention import tpu, gpu\n"
        "print('ok', h.IMPLEMENTATIONS)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr
