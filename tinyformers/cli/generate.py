"""Continue a prompt: the generated text streams to stdout, and nothing else goes there.

Status lines (loading, compiling) and --verbose's figures go to stderr.
"""

from __future__ import annotations

import argparse
import sys

from tinyformers.cli.options import (
    AppendStop,
    add_model_arguments,
    add_sampling_arguments,
    load_from_args,
    print_model_info,
    print_stats,
    read_prompt,
    sampling_options,
    stop_string,
)

HELP = "continue a prompt"
EXAMPLES = """\
examples:
  tinyformers generate "Once upon a time" -n 50
  tinyformers generate --temp 0 --stop "\\n\\n" "Q: What is the capital of France?\\nA:"
  tinyformers generate --model gpt2 --seed 1 "The meaning of life is"
  echo "Hello" | tinyformers generate --echo --verbose
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default="-", help="the prompt; - or absent reads stdin")
    add_model_arguments(p)
    add_sampling_arguments(p, max_new_tokens=256)
    p.add_argument(
        "--stop",
        action=AppendStop,
        default=[],
        type=stop_string,
        metavar="TEXT",
        help="stop before this text (repeatable; \\n, \\t and \\xHH escapes as in llama.cpp)",
    )
    p.add_argument(
        "--truncate",
        action="store_true",
        help="keep the latest prompt tokens if it does not fit the context",
    )
    p.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    p.add_argument(
        "--verbose", "-v", action="store_true", help="the model, threads and timings on stderr"
    )


def run(args: argparse.Namespace) -> int:
    prompt = read_prompt(args.prompt)
    model = load_from_args(args)
    if args.verbose:
        print_model_info(model)
    if args.echo:
        sys.stdout.write(prompt)
    deltas = model.stream(
        prompt,
        args.max_new_tokens,
        stop=args.stop,
        truncate=args.truncate,
        **sampling_options(args),
    )
    for delta in deltas:
        sys.stdout.write(delta)
        sys.stdout.flush()
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    if args.verbose:
        print(f"loaded in {model.load_seconds:.2f} s", file=sys.stderr)
        print_stats(model.last_stats)
    return 0
