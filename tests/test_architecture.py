"""The import rule of ARCHITECTURE.md, read from the source with ast: models import nothing of
loading, kernels or parallel, and loading imports nothing of kernels (at any depth: imports
inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tinyformers"

FORBIDDEN = {  # package -> what its files may not import
    "models": ("loading", "kernels", "parallel"),
    "loading": ("kernels",),
}


def imported(path: Path) -> set[str]:
    """Every tinyformers module a file imports, relative imports resolved."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.update([base] + [f"{base}.{alias.name}" for alias in node.names])
    return {name for name in names if name.startswith("tinyformers")}


@pytest.mark.parametrize("package", FORBIDDEN)
def test_lower_packages_import_nothing_of_the_ones_that_swap_modules_in(package):
    broken = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in sorted((PACKAGE / package).glob("*.py"))
        for name in sorted(imported(path))
        if any(name.startswith(f"tinyformers.{banned}") for banned in FORBIDDEN[package])
    ]
    assert not broken, broken


def test_the_checker_sees_relative_and_nested_imports(tmp_path, monkeypatch):
    """The rule would pass vacuously if `imported` missed an import form."""
    folder = tmp_path / "tinyformers" / "models"
    folder.mkdir(parents=True)
    source = folder / "x.py"
    source.write_text("def f():\n    from ..kernels import fused\nimport tinyformers.parallel\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path / "tinyformers")
    assert {"tinyformers.kernels.fused", "tinyformers.parallel"} <= imported(source)


def test_tokenizers_import_kernels_only_to_build_their_encoder():
    """ARCHITECTURE.md: tokenizers reach kernels in one place, `_build_native`, at the first
    encode, so loading a tokenizer compiles nothing (imports for type hints only are fine)."""
    places = []
    for path in sorted((PACKAGE / "tokenizers").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        hints = [
            n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
        ]
        skip = {id(node) for block in hints for node in ast.walk(block)}
        where = {
            id(node): f.name
            for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef)
            for node in ast.walk(f)
        }
        for node in ast.walk(tree):
            module = node.module or "" if isinstance(node, ast.ImportFrom) else ""
            if "kernels" in module and id(node) not in skip:
                places.append((path.name, where.get(id(node), "<module>")))
    assert places and {name for _, name in places} == {"_build_native"}, places
