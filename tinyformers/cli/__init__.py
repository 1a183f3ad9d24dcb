"""`tinyformers` command line: one module per subcommand, each with `add_parser(subparsers)`.

Errors reach the user as one line on stderr: exit 2 for a bad flag (argparse's convention),
1 for anything else we can name (a missing file, a broken checkpoint, a prompt too long).
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from tinyformers.errors import TinyformersError

COMMANDS = ("generate", "chat", "tokenize")


class _Parser(argparse.ArgumentParser):
    """argparse prints a usage block before the error; we print the error line only."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="tinyformers", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        import_module(f"tinyformers.cli.{name}").add_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except TinyformersError as e:
        print(f"tinyformers: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
