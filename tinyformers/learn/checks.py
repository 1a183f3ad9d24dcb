"""Checking a learner's exercises: load their file, call each function on fixed inputs and
compare with a reference computation (torch, or the model itself), within a stated tolerance.

One line per exercise: `1.2 matvec: passed`, or what was expected and what came back. A file
that cannot be loaded is a TinyformersError (one line, exit 1 in the CLI); an exercise that
raises is reported on its own line, never as a traceback.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from tinyformers.errors import TinyformersError


@dataclass
class Exercise:
    """One function the learner writes, and its check: `check(fn)` is None when `fn` is
    right, else a short sentence saying what was expected and what came back."""

    name: str
    check: Callable[[Callable], str | None]


@dataclass
class Result:
    line: str
    passed: bool


def load_file(path: Path) -> ModuleType:
    """The learner's file as a module; a missing file, a syntax error or an error while it
    runs is one line."""
    if not path.is_file():
        raise TinyformersError(f"{path}: no such file")
    try:
        source = path.read_text(encoding="utf-8")
        code = compile(source, str(path), "exec")
    except SyntaxError as e:
        raise TinyformersError(f"{path}, line {e.lineno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TinyformersError(f"{path}: cannot be read: {e}") from None
    spec = importlib.util.spec_from_file_location(f"learn_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        exec(code, module.__dict__)
    except Exception as e:  # the learner's module-level code: say what, not where
        raise TinyformersError(f"{path}: {type(e).__name__} while loading: {e}") from None
    return module


def run(exercises: list[Exercise], chapter: int, module: ModuleType, path: Path) -> list[Result]:
    """Each exercise of `module`, checked in order."""
    results = []
    for number, exercise in enumerate(exercises, 1):
        head = f"{chapter}.{number} {exercise.name}"
        fn = getattr(module, exercise.name, None)
        if not callable(fn):
            results.append(Result(f"{head}: not in {path} (write def {exercise.name})", False))
            continue
        try:
            problem = exercise.check(fn)
        except NotImplementedError:
            problem = "not written yet (it raises NotImplementedError)"
        except Exception as e:  # the learner's code raised: one line, no traceback
            message = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            problem = f"raised {type(e).__name__}" + (f": {message}" if message else "")
        results.append(Result(f"{head}: {problem or 'passed'}", problem is None))
    return results


def compare(expected, got, tol: float, call: str = "") -> str | None:
    """None when `got` equals `expected`: strings exactly, numbers (a float, a list, a
    tensor) each within `tol`, infinities as themselves. Else one sentence, that starts with
    `call` (what was called, e.g. "dot([1, 2], [3, 4])") where given."""
    prefix = f"{call}: " if call else ""
    if isinstance(expected, str | list) and expected and all(isinstance(e, str) for e in expected):
        return None if got == expected else f"{prefix}expected {expected!r}, got {short(got)}"
    try:
        got_t = as_tensor(got)
    except (TypeError, ValueError, RuntimeError):
        return f"{prefix}expected {show(as_tensor(expected))}, got {short(got)}"
    want = as_tensor(expected)
    if got_t.shape != want.shape:
        return f"{prefix}expected shape {list(want.shape)}, got shape {list(got_t.shape)}"
    same = got_t == want  # also inf == inf, which has no finite difference
    off = ~(same | ((got_t - want).abs() <= tol))  # a NaN is off
    if not off.any():
        return None
    if want.numel() <= 8:
        return f"{prefix}expected {show(want)}, got {show(got_t)} (each within {tol:g})"
    where = [int(i) for i in off.nonzero()[0]]
    at = tuple(where) if len(where) > 1 else where[0]
    return (
        f"{prefix}{int(off.sum())} of {want.numel()} numbers differ by more than {tol:g}; "
        f"the first at {list(where)}: expected {number(want[at])}, got {number(got_t[at])}"
    )


def as_tensor(value) -> Tensor:
    """float64 numbers from a tensor (gradients dropped), a number or nested lists."""
    if isinstance(value, Tensor):
        return value.detach().to(torch.float64)
    if value is None or isinstance(value, str):
        raise TypeError(f"not numbers: {value!r}")
    return torch.as_tensor(value, dtype=torch.float64)


def number(x: Tensor | float) -> str:
    x = float(x)
    return str(x) if math.isinf(x) or math.isnan(x) else f"{x:.6g}"


def show(t: Tensor) -> str:
    """A small tensor as a list of short numbers: [17, 39], [[0.5, -inf]]."""
    if t.dim() == 0:
        return number(t)
    return "[" + ", ".join(show(row) for row in t) + "]"


def short(value) -> str:
    """What came back, in a few words: a small value in full, a big one by type and shape."""
    if isinstance(value, Tensor):
        return show(value) if value.numel() <= 8 else f"a tensor of shape {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else f"a {type(value).__name__} ({text[:60]}...)"
