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
