"""The course's exercises: write a chapter's template, then check it.

`start N` writes learn/chNN.py: the functions of chapter N's exercises, each with its
docstring and no body. Write them, then `check N`: one line per exercise, passed or what was
expected and what came back; exit 0 when every one passes, 1 otherwise. The chapters are in
docs/learn/ (01-numbers-vectors-matrices.md first).
"""

from __future__ import annotations

import argparse
import os

from tinyformers.cli.options import add_threads_argument, typed
from tinyformers.errors import TinyformersError

HELP = "the course's exercises: start a chapter, check it"
EXAMPLES = """\
examples:
  tinyformers learn                  the chapters and their exercises
  tinyformers learn start 1          write learn/ch01.py
  tinyformers learn check 1          check it: one line per exercise
  tinyformers learn check 3 mine.py  check another file
"""

CHAPTER = typed(int, lambda n: 1 <= n <= 8, "a chapter from 1 to 8")


def add_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    start = actions.add_parser("start", help="write learn/chNN.py, the chapter's template")
    start.add_argument("chapter", type=CHAPTER, help="1 to 8")
    check = actions.add_parser("check", help="check the exercises, one line each")
    check.add_argument("chapter", type=CHAPTER, help="1 to 8")
    check.add_argument("file", nargs="?", help="the file to check (default: learn/chNN.py)")
    add_threads_argument(p, note="; the checks that load a model use them")


def run(args: argparse.Namespace) -> int:
    import torch

    from tinyformers import learn

    if args.threads:
        # Through the environment: `load` inside a check reads OMP_NUM_THREADS.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    if args.action == "start":
        path = learn.default_path(args.chapter)
        if path.exists():
            raise TinyformersError(
                f"{path} exists: check it with `tinyformers learn check {args.chapter}`, "
                "or move it away to start again"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(learn.template(args.chapter), encoding="utf-8")
        print(f"wrote {path}: write its functions, then `tinyformers learn check {args.chapter}`")
        return 0
    if args.action == "check":
        path = args.file or learn.default_path(args.chapter)
        if args.file is None and not path.is_file():
            raise TinyformersError(
                f"{path}: no such file; `tinyformers learn start {args.chapter}` writes it"
            )
        lines, passed = learn.check(args.chapter, path)
        print("\n".join(lines))
        return 0 if passed else 1
    from tinyformers.learn.exercises import EXERCISES

    for n, name in learn.CHAPTERS.items():
        names = ", ".join(e.name for e in EXERCISES[n])
        print(f"{n}  docs/learn/{name}.md  ({names})")
    print("`tinyformers learn start N` writes a chapter's exercises to learn/chNN.py")
    return 0
