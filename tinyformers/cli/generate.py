"""`tinyformers generate PROMPT`: stream a continuation to stdout, and nothing else."""

from __future__ import annotations

import argparse
import sys

from tinyformers.cli.options import (
    add_model_arguments,
    add_sampling_arguments,
    load_from_args,
    sampling_options,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="continue a prompt", description=__doc__)
    p.add_argument("prompt", nargs="?", default="-", help="the prompt; - or absent reads stdin")
    add_model_arguments(p)
    add_sampling_arguments(p, max_new_tokens=256)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--truncate",
        action="store_true",
        help="keep the latest prompt tokens if it does not fit the context",
    )
    p.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    p.add_argument("--verbose", "-v", action="store_true", help="timings on stderr")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt  # the newline echo adds
    model = load_from_args(args)
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
        s = model.last_stats
        print(
            f"{model.source} ({model.dtype}, {model.device}) loaded in {model.load_seconds:.2f} s\n"
            f"prompt: {s.prompt_tokens} tokens, prefill {s.prefill_seconds:.2f} s "
            f"({s.prompt_tokens / max(s.prefill_seconds, 1e-9):.1f} tok/s)\n"
            f"generated: {s.new_tokens} tokens, decode {s.decode_tokens_per_second:.1f} tok/s",
            file=sys.stderr,
        )
    return 0
