"""Keep a doc's links to lines of code true: each link names the code it points at.

A link such as [`scores = q @ k.transpose(-2, -1) * self.scale`](../tinyformers/models/gpt2.py#L123)
carries its code fragment as the link text. `--check` lists every link whose lines no longer
hold its fragment (tests/test_walkthrough.py runs it); without it, each link is pointed again
at the lines where its fragment now is, the occurrence nearest the old line if there are
several. Whitespace runs compare equal, so a fragment may span lines (#L95-L97).

Usage: python -m tools.relink [--check] docs/walkthrough.md
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# [`fragment`](relative/path.py#L10) or #L10-L12; the backticks make the text code.
LINK = re.compile(
    r"\[`(?P<fragment>[^`]+)`\]\((?P<path>[^)#\s]+)#L(?P<start>\d+)(?:-L(?P<end>\d+))?\)"
)


def find(fragment: str, lines: list[str]) -> list[tuple[int, int]]:
    """Every (first, last) 1-based line range holding `fragment`, whitespace runs as one."""
    text, line_of = "", []  # the file with whitespace collapsed, and each character's line
    for number, line in enumerate(lines, start=1):
        piece = " ".join(line.split()) + " "
        text += piece
        line_of += [number] * len(piece)
    wanted = " ".join(fragment.split())
    found, start = [], text.find(wanted)
    while start >= 0:
        found.append((line_of[start], line_of[start + len(wanted) - 1]))
        start = text.find(wanted, start + 1)
    return found


def relink(doc: Path, fix: bool) -> list[str]:
    """The problems with `doc`'s links (after fixing what can be, with `fix`)."""
    problems: list[str] = []
    sources: dict[Path, list[str]] = {}

    def repoint(m: re.Match) -> str:
        path = (doc.parent / m["path"]).resolve()
        if path not in sources:
            if not path.is_file():
                problems.append(f"{doc}: link to {m['path']}: no such file")
                return m[0]
            sources[path] = path.read_text(encoding="utf-8").splitlines()
        start, end = int(m["start"]), int(m["end"] or m["start"])
        held = " ".join(" ".join(sources[path][start - 1 : end]).split())
        if " ".join(m["fragment"].split()) in held:
            return m[0]
        ranges = find(m["fragment"], sources[path])
        if not fix or not ranges:
            where = "is nowhere in the file" if not ranges else f"is at #L{ranges[0][0]}"
            problems.append(f"{doc}: {m['path']}#L{m['start']}: `{m['fragment']}` {where}")
            return m[0]
        first, last = min(ranges, key=lambda r: abs(r[0] - start))
        lines = f"#L{first}" if first == last else f"#L{first}-L{last}"
        return f"[`{m['fragment']}`]({m['path']}{lines})"

    text = doc.read_text(encoding="utf-8")
    fixed = LINK.sub(repoint, text)
    if fix and fixed != text:
        doc.write_text(fixed, encoding="utf-8")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("docs", nargs="+", type=Path, help="markdown files")
    parser.add_argument("--check", action="store_true", help="report stale links, change nothing")
    args = parser.parse_args(argv)
    problems = [p for doc in args.docs for p in relink(doc, fix=not args.check)]
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
