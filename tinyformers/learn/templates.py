"""A chapter's template, made from its solution: the module as written, each function cut
after its docstring and given `raise NotImplementedError` for a body. One source for both,
so a template's signatures and docstrings are always the ones the checks call."""

from __future__ import annotations

import ast
from importlib import resources

STUB = '    raise NotImplementedError("write this function, then: tinyformers learn check {n}")'


def solution_source(chapter: int) -> str:
    return (
        resources.files("tinyformers.learn.solutions").joinpath(f"ch{chapter:02d}.py").read_text()
    )


def template(chapter: int) -> str:
    """The learner's starting file for `chapter`: the solution less every function's body."""
    source = solution_source(chapter)
    lines = source.splitlines()
    out: list[str] = []
    done = 0  # lines[:done] are handled
    for node in ast.parse(source).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        docstring = node.body[0]
        assert isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)
        out += lines[done : docstring.end_lineno]  # up to the end of the docstring
        out.append(STUB.format(n=chapter))
        done = node.end_lineno
    out += lines[done:]
    return "\n".join(out) + "\n"
