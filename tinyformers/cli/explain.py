"""Look inside the model: how it reads a prompt and what it predicts next.

Prints the prompt's tokens, the most likely next tokens, and the logit lens (the top next
token read from the residual stream after each layer). --layer L prints the attention
weights of each head of layer L (--head H: of head H only); --out DIR writes one PNG of
attention heat maps per layer and attention.html, a page to explore them offline, and says
on stderr what it wrote. Only the tables go to stdout.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from tinyformers.cli.options import (
    add_model_arguments,
    load_from_args,
    print_model_info,
    read_prompt,
    status,
    typed,
)

HELP = "look inside the model: tokens, next-token odds, logit lens, attention"
EXAMPLES = """\
examples:
  tinyformers explain "The capital of France is"
  tinyformers explain "The capital of France is" --layer 3 --head 1
  tinyformers explain "The capital of France is" --out explain/     then open explain/attention.html
  tinyformers explain --model gpt2 "Hello, my dog is a" --top-k 5
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="?", default="-", help="the prompt; - or absent reads stdin")
    add_model_arguments(p, compile=False)
    index = typed(int, lambda v: v >= 0, "an integer >= 0")
    p.add_argument(
        "--top-k",
        type=typed(int, lambda v: 1 <= v <= 1000, "an integer from 1 to 1000"),
        default=10,
        metavar="K",
        help="next tokens to list",
    )
    p.add_argument(
        "--layer", type=index, metavar="L", help="print the attention weights of layer L's heads"
    )
    p.add_argument("--head", type=index, metavar="H", help="with --layer: of head H only")
    p.add_argument("--out", type=Path, metavar="DIR", help="write layer_NN.png and attention.html")
    p.add_argument("--verbose", "-v", action="store_true", help="the model and timings on stderr")


def run(args: argparse.Namespace) -> int:
    from tinyformers.explain import explain, tables

    if args.head is not None and args.layer is None:
        return usage_error("--head needs --layer (a head of which layer?)")
    text = read_prompt(args.text)
    model = load_model(args)
    if args.verbose:
        print_model_info(model)
    n_layer = model.config.layer_count
    if args.layer is not None and args.layer >= n_layer:
        return usage_error(f"--layer {args.layer} is out of range: layers are 0 to {n_layer - 1}")
    layers = None if args.out else [] if args.layer is None else [args.layer]
    start = time.perf_counter()
    ex = explain(model, text, args.top_k, layers)
    status(
        f"load {model.load_seconds:.2f} s, forward passes {time.perf_counter() - start:.2f} s", args
    )
    n_head = model_heads(ex)
    if args.head is not None and args.head >= n_head:
        return usage_error(f"--head {args.head} is out of range: heads are 0 to {n_head - 1}")
    width = max(60, shutil.get_terminal_size((120, 24)).columns)
    parts = [tables.token_table(ex), tables.next_token_table(ex), tables.lens_table(ex, width)]
    if args.layer is not None:
        heads = range(n_head) if args.head is None else [args.head]
        parts += [tables.pattern_table(ex, args.layer, h, width) for h in heads]
    print("\n\n".join(parts))
    if args.out:
        write_files(ex, args.out, args)
    return 0


def write_files(ex, out: Path, args: argparse.Namespace) -> None:
    from tinyformers.errors import TinyformersError
    from tinyformers.explain import most_interesting_head
    from tinyformers.explain.html import write_html
    from tinyformers.explain.png import write_pngs

    start = time.perf_counter()
    try:
        out.mkdir(parents=True, exist_ok=True)
        pngs = write_pngs(ex, out)
        write_html(ex, out / "attention.html")
    except OSError as e:
        raise TinyformersError(f"--out {out}: {e.strerror or e}") from e
    seconds = time.perf_counter() - start
    layer, head = most_interesting_head(ex.patterns)
    print(  # always, not only on a terminal: the files are what --out was asked for
        f"wrote {len(pngs)} PNGs ({pngs[0]} to {pngs[-1].name}) and {out / 'attention.html'} "
        f"in {seconds:.2f} s; the page opens on layer {layer} head {head}",
        file=sys.stderr,
    )


def load_model(args: argparse.Namespace):
    """The model as `load_from_args` loads it, but left as the checkpoint's matrices unless
    --quantize needs the kernels: a hook makes attention take the written-out path anyway, so
    packing the matrices for the decode kernels (1-2 s) would buy one forward pass 0.2 s."""
    return load_from_args(args, fast=bool(args.quantize))


def model_heads(ex) -> int:
    """Heads per layer, read off a computed pattern (0 when none was asked for)."""
    return next((p.shape[0] for p in ex.patterns.values()), 0)


def usage_error(message: str) -> int:
    """A flag the model cannot take, as argparse reports a bad flag: one line, exit 2."""
    print(f"tinyformers explain: error: {message}", file=sys.stderr)
    return 2
