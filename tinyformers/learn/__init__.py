"""The course's exercises (docs/learn/): a template per chapter for the learner to fill in,
and checks that say, per exercise, passed or what was expected and what came back.

    tinyformers learn start 1          writes learn/ch01.py, the functions to write
    tinyformers learn check 1          checks them, one line each

From Python: `check(1, "learn/ch01.py")` gives the lines and whether all passed.
"""

from __future__ import annotations

from pathlib import Path

from tinyformers.learn.templates import template

CHAPTERS = {
    1: "01-numbers-vectors-matrices",
    2: "02-tokens-and-embeddings",
    3: "03-attention",
    4: "04-softmax-and-temperature",
    5: "05-residual-layernorm-mlp",
    6: "06-unembedding",
    7: "07-loss-and-a-gradient-step",
    8: "08-circuits",
}

__all__ = ["CHAPTERS", "check", "default_path", "template"]


def default_path(chapter: int) -> Path:
    """Where `start` writes a chapter's file and `check` reads it: ./learn/chNN.py."""
    return Path("learn") / f"ch{chapter:02d}.py"


def check(chapter: int, path: str | Path) -> tuple[list[str], bool]:
    """(one line per exercise, whether every exercise passed) for the learner's file."""
    from tinyformers.learn import checks
    from tinyformers.learn.exercises import EXERCISES

    path = Path(path)
    results = checks.run(EXERCISES[chapter], chapter, checks.load_file(path), path)
    return [r.line for r in results], all(r.passed for r in results)
