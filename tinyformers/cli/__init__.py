"""The `tinyformers` command: one module per subcommand, each with its `HELP` line, its
docstring and `EXAMPLES` for `--help`, `add_arguments(parser)` and `run(args)`.

Errors reach the user as one line on stderr: exit 2 for a bad flag (argparse's convention),
1 for anything else we can name (a missing file, a broken checkpoint, a prompt too long).
"""

from __future__ import annotations

import os
import sys
from importlib import import_module

from tinyformers import __version__
from tinyformers.cli.options import Parser, launched_by_torchrun, load_from_args
from tinyformers.errors import TinyformersError

# Subcommands, in the order `--help` lists them; each is tinyformers/cli/<name>.py.
COMMANDS = (
    "generate",
    "chat",
    "tokenize",
    "explain",
    "lab",
    "learn",
    "perplexity",
    "serve",
    "train",
)
# The ones that run under torchrun, the model split across its processes (tensor parallel).
TENSOR_PARALLEL = ("generate", "chat", "perplexity", "serve")

DESCRIPTION = """\
Run GPT-2 and Llama-family language models on the CPU: generate text, chat, look at the
tokens and inside the model (in the terminal, or live in the lab's page), measure perplexity,
serve an OpenAI-compatible API, train one from scratch or fine-tune one. Without --model,
the offline default SmolLM2-135M-Instruct."""

EXAMPLES = """\
examples:
  echo "What is the capital of France?" | tinyformers chat --temp 0
  tinyformers generate "Once upon a time" -n 50
  tinyformers tokenize "Hello world"
  tinyformers lab                 a page that shows inside the model as you type
  tinyformers train --data shakespeare.txt --out shakespeare-char
  tinyformers COMMAND --help      the flags of one command, with their defaults
"""


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="tinyformers", description=DESCRIPTION, epilog=EXAMPLES)
    parser.add_argument("--version", action="version", version=f"tinyformers {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMANDS:
        command = import_module(f"tinyformers.cli.{name}")
        p = subparsers.add_parser(
            name, help=command.HELP, description=command.__doc__, epilog=command.EXAMPLES
        )
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `tinyformers`: say what it takes
        parser.print_usage(sys.stderr)
        print(
            "tinyformers: error: name a command; `tinyformers --help` lists them", file=sys.stderr
        )
        return 2
    try:
        if launched_by_torchrun() and args.command != "train":  # train: data parallel
            if args.command not in TENSOR_PARALLEL:
                raise TinyformersError(
                    f"{args.command} does not run under torchrun "
                    f"(tensor parallel runs {', '.join(TENSOR_PARALLEL)})"
                )
            if os.environ.get("RANK", "0") != "0":  # only rank 0 reads stdin and prints
                load_from_args(args)  # runs rank 0's model calls on this rank, then exits
        return args.run(args) or 0
    except TinyformersError as e:
        print(f"tinyformers: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
