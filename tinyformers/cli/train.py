"""Train a model: a small GPT from scratch on a text file, or fine-tune one we load (every
weight, or LoRA adapters). Flags are nanoGPT's config keys with dashes; from scratch, the
defaults are its shakespeare_char recipe for a CPU.

DIR becomes a Hugging Face checkpoint folder that every tinyformers command loads
(`tinyformers generate --model DIR`), with metrics.jsonl (one line per evaluation),
loss.png, and checkpoint/ for --resume. Ctrl-C saves a checkpoint and stops.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from pathlib import Path

from tinyformers.cli.options import add_threads_argument, launched_by_torchrun, typed
from tinyformers.errors import TinyformersError

HELP = "train from scratch or fine-tune"
EXAMPLES = """\
examples:
  tinyformers train --data shakespeare.txt --out shakespeare-char
  tinyformers generate --model shakespeare-char -n 200 "ROMEO:"
  tinyformers train --data notes.txt --out smol-notes --model smollm2 --lora 8
  tinyformers train --data chats.jsonl --out smol-chat --model smollm2 --max-iters 100
  torchrun --nproc-per-node 2 -m tinyformers train --data shakespeare.txt --out ddp \\
      --gradient-accumulation-steps 2
"""

# What a run writes into DIR; --overwrite removes these (and nothing else) first.
OUR_FILES = (
    "checkpoint",
    "checkpoint.old",
    "checkpoint.tmp",
    "metrics.jsonl",
    "loss.png",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "adapter_config.json",
    "adapter_model.safetensors",
)

POSITIVE = typed(int, lambda v: v >= 1, "an integer >= 1")
COUNT = typed(int, lambda v: v >= 0, "an integer >= 0")
RATE = typed(float, lambda v: 0 < v < math.inf, "a number > 0")
FRACTION = typed(float, lambda v: 0 <= v < 1, "a number from 0 to below 1")
ALPHA = typed(float, lambda v: 0 < v <= 1e6, "a number > 0")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path, help="a UTF-8 text file, or .jsonl")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="the output folder")
    what = p.add_argument_group("what to train")
    what.add_argument("--model", "-m", help="fine-tune this checkpoint (anything --model takes)")
    what.add_argument(
        "--tokenizer",
        help="from scratch: char (the text's characters, default) or a model's (gpt2, smollm2)",
    )
    what.add_argument("--arch", choices=["gpt2", "llama"], help="from scratch (default gpt2)")
    what.add_argument("--lora", type=POSITIVE, metavar="R", help="train LoRA adapters of rank R")
    what.add_argument("--lora-alpha", type=ALPHA, help="LoRA's alpha (default 2 * R)")
    what.add_argument(
        "--lora-targets",
        type=lambda text: tuple(t for t in text.split(",") if t),
        help="comma-separated layer names (default: attention and MLP projections)",
    )
    what.add_argument("--lora-dropout", type=FRACTION, help="dropout on LoRA's input (default 0)")
    what.add_argument(
        "--merge", action="store_true", help="LoRA: write merged weights, not the adapter"
    )
    sizes = p.add_argument_group("model size (from scratch)")
    for flag in ("--n-layer", "--n-head", "--n-embd"):
        sizes.add_argument(flag, type=POSITIVE)
    loop = p.add_argument_group("training (nanoGPT's config keys)")
    loop.add_argument("--block-size", type=POSITIVE, help="tokens per sequence")
    loop.add_argument("--batch-size", type=POSITIVE, help="sequences per micro-batch")
    loop.add_argument("--max-iters", type=COUNT, help="optimizer steps")
    loop.add_argument("--learning-rate", "--lr", type=RATE, help="peak learning rate")
    loop.add_argument("--min-lr", type=typed(float, lambda v: 0 <= v < math.inf, "a number >= 0"))
    loop.add_argument("--lr-decay-iters", type=POSITIVE, help="(default: max-iters)")
    loop.add_argument("--warmup-iters", type=COUNT)
    loop.add_argument("--beta1", type=FRACTION)
    loop.add_argument("--beta2", type=FRACTION)
    loop.add_argument("--weight-decay", type=typed(float, lambda v: 0 <= v < 10, "a number >= 0"))
    loop.add_argument("--grad-clip", type=typed(float, lambda v: v >= 0, "a number >= 0 (0: off)"))
    loop.add_argument("--dropout", type=FRACTION)
    loop.add_argument("--eval-interval", type=POSITIVE)
    loop.add_argument("--eval-iters", type=POSITIVE)
    loop.add_argument("--gradient-accumulation-steps", type=POSITIVE)
    loop.add_argument("--seed", type=typed(int, lambda v: 0 <= v < 2**63, "an integer >= 0"))
    run_group = p.add_argument_group("the run")
    run_group.add_argument(
        "--device",
        type=typed(str, lambda v: v == "cpu" or v.startswith("cuda"), "cpu or cuda"),
        help="cpu (default) or cuda (bfloat16 autocast)",
    )
    run_group.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="fine-tune: the weights' dtype"
    )
    add_threads_argument(run_group)
    run_group.add_argument(
        "--sample-tokens", type=COUNT, help="tokens of the sample printed at the end (200)"
    )
    run_group.add_argument("--resume", action="store_true", help="continue DIR's last checkpoint")
    run_group.add_argument(
        "--overwrite", action="store_true", help="start over in a DIR that holds a run"
    )


def run(args: argparse.Namespace) -> int:
    if "torch" not in sys.modules and not launched_by_torchrun():
        # A step waits on its threads hundreds of times; threads that spin rather than sleep
        # between ops make it steadily faster: 21.5 ms against 23-26 for the CPU recipe on
        # an AMD EPYC (docs/training.md). Read by OpenMP once, when torch loads it.
        os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
    from tinyformers.training import checkpoint as ckpt
    from tinyformers.training.settings import resolve
    from tinyformers.training.trainer import Stop, train

    rank = os.environ.get("RANK", "0")
    given = {k: v for k, v in vars(args).items() if k not in ("run", "command")}
    given["data"], given["out"] = str(args.data), str(args.out)
    saved = None
    if args.resume and args.overwrite:
        raise TinyformersError("--resume continues DIR's run, --overwrite discards it: pick one")
    if args.resume:
        saved = ckpt.load_checkpoint(args.out)[2]["settings"]
    elif _holds_a_run(args.out):
        if not args.overwrite:
            raise TinyformersError(
                f"{args.out}: holds a training run already; pass --resume to continue it or "
                "--overwrite to start over"
            )
        if rank == "0":
            for name in OUR_FILES:
                path = args.out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    settings = resolve(given, saved)
    log = print if rank == "0" else (lambda *a, **k: None)
    try:
        out = train(settings, resume=args.resume, log=lambda m: print(m, file=sys.stderr))
    except Stop as e:  # after saving what could be saved: a NaN, a full disk, Ctrl-C
        if rank == "0":
            kind = "" if e.exit_code == 130 else "error: "
            print(f"tinyformers: {kind}{e}", file=sys.stderr)
        return e.exit_code
    if rank == "0":
        print(f"saved the model in {out} (metrics.jsonl, loss.png)", file=sys.stderr)
        if settings.sample_tokens:
            log(_sample(settings))
    return 0


def _holds_a_run(out: Path) -> bool:
    if out.exists() and not out.is_dir():
        raise TinyformersError(f"{out}: exists and is not a folder")
    return out.is_dir() and any(out.iterdir())


def _sample(settings) -> str:
    """A continuation of a new line by the saved model, loaded back from the out dir as any
    command loads it. As nanoGPT's sample.py: temperature 0.8, top-k 200, and past the
    model's context each step reads only the last `context` tokens."""
    import torch

    import tinyformers
    from tinyformers.generation.sampling import SamplingParams, next_tokens
    from tinyformers.tokenizers import prompt_ids

    if settings.lora and not settings.merge:
        model = tinyformers.load(settings.model, adapter=settings.out)
    else:
        model = tinyformers.load(settings.out)
    params = SamplingParams(temperature=0.8, top_k=200, top_p=1.0, min_p=0.0, seed=0)
    generator = torch.Generator().manual_seed(0)
    ids = prompt_ids(model.tokenizer, "\n")
    start, context = len(ids), model.config.context_length
    for _ in range(settings.sample_tokens):
        window = torch.tensor([ids[-context:]])
        logits = model(window)[:, -1]  # (1, V): the next token's scores
        token = next_tokens(logits, params, window, generator).item()
        if token in model.eos_ids:
            break
        ids.append(token)
    return model.tokenizer.decode(ids[start - 1 :])
