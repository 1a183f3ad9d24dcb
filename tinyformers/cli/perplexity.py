"""Measure a model's perplexity on a text file: exp of the mean negative log-likelihood of
each token given the tokens before it.

The text is cut into windows of --context tokens, each scored on its own from its second
token on (one window: the figure benchmarks/generate.py reports). llama.cpp's
`llama-perplexity -c N` scores only the second half of each window: --second-half does the
same, for a like-for-like comparison.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from tinyformers.cli.options import add_model_arguments, load_from_args, typed
from tinyformers.errors import TinyformersError

HELP = "measure perplexity on a text file"
EXAMPLES = """\
examples:
  tinyformers perplexity benchmarks/perplexity.txt
  tinyformers perplexity wiki.test.raw --model gpt2 --context 512 --second-half
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="a UTF-8 text file")
    add_model_arguments(p, compile=False)
    p.add_argument(
        "--context",
        "-c",
        type=typed(int, lambda v: v >= 2, "an integer >= 2"),
        default=None,
        metavar="N",
        help="tokens per window (default: the model's context, at most 1024)",
    )
    p.add_argument(
        "--second-half",
        action="store_true",
        help="score only the second half of each window, as llama-perplexity does",
    )


def run(args: argparse.Namespace) -> int:
    if not args.file.is_file():  # a folder, a FIFO or /dev/zero would hang or fill memory
        raise TinyformersError(f"{args.file}: not a regular file")
    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TinyformersError(f"{args.file}: cannot read it as UTF-8 text ({e})") from None
    model = load_from_args(args)
    if model.tokenizer is None:
        raise TinyformersError(f"{model.source}: no tokenizer files to turn the text into tokens")
    ids = model.tokenizer.encode(text)
    context = min(args.context or 1024, model.config.context_length)
    tok = model.tokenizer
    bos = tok.bos_token_id if tok.add_bos_token else None
    nll, scored = perplexity_sums(model, ids, context, args.second_half, bos)
    if not scored:
        raise TinyformersError(f"{args.file}: {len(ids)} tokens, too few to score")
    windows = math.ceil(len(ids) / context)
    print(
        f"perplexity {math.exp(nll / scored):.4f} over {scored} tokens "
        f"({windows} window{'s' * (windows > 1)} of up to {context} tokens)"
    )
    return 0


def perplexity_sums(
    model, ids: list[int], context: int, second_half: bool, bos: int | None = None
) -> tuple[float, int]:
    """(sum of negative log-likelihoods, tokens scored) over windows of `context` tokens.

    bos: a model that reads BOS first (Gemma) gets it at the head of every window, and then its
    first text token is scored too (llama.cpp's perplexity does the same)."""
    import torch
    import torch.nn.functional as F

    nll, scored = 0.0, 0
    head = [] if bos is None else [bos]
    step = context - len(head)
    starts = range(0, len(ids), step)
    for i, start in enumerate(starts, 1):
        window = torch.tensor([head + ids[start : start + step]])  # (1, T)
        first = context // 2 if second_half else 1  # the first position scored
        if window.shape[1] <= first:
            break
        logits = model(window)[0].float()  # (T, vocab); position t predicts token t + 1
        nll += F.cross_entropy(logits[first - 1 : -1], window[0, first:], reduction="sum").item()
        scored += window.shape[1] - first
        if sys.stderr.isatty():  # a progress line, rewritten in place
            print(
                f"\rwindow {i}/{len(starts)}: {math.exp(nll / scored):.4f}", end="", file=sys.stderr
            )
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return nll, scored
