"""Tensor parallel on this machine: all-reduce latency, decode speed and memory per rank.

    python -m benchmarks.distributed [--tokens 64] [--rounds 3] [--skip-smollm2]

Every rank is a process on 127.0.0.1 (gloo), started as torchrun starts them, 1 thread each.
Measured:
- all-reduce latency: the median of 2000 all-reduces of float32 [1, 1, C] (one decode
  step's activation) between 2 ranks, for several C, and of the 19-int64 header rank 0
  broadcasts before each call;
- decode tok/s of GPT-2 124M (the real shape, random weights, float32, our default fast path),
  greedy, `--tokens` new tokens after an 8-token prompt, best of `--rounds`: 1 process x 1
  thread, 1 process x 2 threads, 2 ranks x 1 thread;
- the weights each rank holds and its peak RSS (VmHWM) over its start, for GPT-2 on 1 and 2
  ranks and SmolLM2-135M (GGUF, dequantized to float32) on 1 and 3 ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = (576, 768, 2048, 4096, 8192)  # SmolLM2-135M, GPT-2, and larger models' hidden sizes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args: list[str], threads: int = 1) -> None:
    """`world` ranks of this module with `args`; each must exit 0 within 10 minutes."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
        command = [sys.executable, "-m", "benchmarks.distributed", *args]
        procs.append(subprocess.Popen(command, env=env))
    for p in procs:
        if p.wait(timeout=600):
            raise SystemExit(f"a rank of {args} exited with {p.returncode}")


def peak_rss() -> int:
    """VmHWM: this process's peak resident memory (ru_maxrss would carry the parent's over)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# The ranks ---------------------------------------------------------------------------------------


def rank_allreduce(out: Path) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    results = {}
    for name, tensor, op in [
        *((f"all_reduce C={c}", torch.randn(1, 1, c), dist.all_reduce) for c in SIZES),
        ("broadcast header", torch.zeros(19, dtype=torch.long), lambda t: dist.broadcast(t, 0)),
    ]:
        for _ in range(200):  # warm-up: connections, buffers
            op(tensor)
        times = []
        for _ in range(2000):
            start = time.perf_counter()
            op(tensor)
            times.append(time.perf_counter() - start)
        results[name] = sorted(times)[len(times) // 2] * 1e6
    if dist.get_rank() == 0:
        (out / "allreduce.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def rank_model(path: str, out: Path, tag: str, tokens: int, rounds: int, threads: int) -> None:
    import atexit

    import tinyformers
    from tinyformers import kernels

    kernels.available()
    rank = int(os.environ.get("RANK", "0"))
    tensor_parallel = int(os.environ.get("WORLD_SIZE", "1")) > 1
    before = rss()
    atexit.register(
        lambda: (out / f"{tag}-rank{rank}.json").write_text(
            json.dumps({"before": before, "peak": peak_rss()})
        )
    )
    model = tinyformers.load(path, threads=threads, tensor_parallel=tensor_parallel)
    weights = sum(t.nbytes for t in [*model.net.parameters(), *model.net.buffers()])
    best = 0.0
    for _ in range(rounds if tokens else 0):
        model.generate_ids(list(range(100, 108)), max_new_tokens=tokens, temperature=0)
        best = max(best, model.last_stats.decode_tokens_per_second)
    (out / f"{tag}.json").write_text(json.dumps({"tok_s": best, "weights": weights}))


# The driver --------------------------------------------------------------------------------------


def gpt2_folder(folder: Path) -> Path:
    """GPT-2 124M with random weights, saved as Hugging Face saves it (safetensors)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    return folder


def report(out: Path, tag: str, world: int) -> dict:
    result = json.loads((out / f"{tag}.json").read_text())
    ranks = [json.loads((out / f"{tag}-rank{r}.json").read_text()) for r in range(world)]
    result["grew_mb"] = max((r["peak"] - r["before"]) / 2**20 for r in ranks)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-smollm2", action="store_true")
    p.add_argument("--rank", nargs="*", help=argparse.SUPPRESS)  # what a rank runs
    args = p.parse_args()
    if args.rank:
        role, *rest = args.rank
        if role == "allreduce":
            return rank_allreduce(Path(rest[0]))
        path, out, tag, threads = rest[0], Path(rest[1]), rest[2], int(rest[3])
        return rank_model(path, out, tag, args.tokens, args.rounds, threads)

    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    print(f"{cpu}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        launch(2, ["--rank", "allreduce", tmp])
        print("\nlatency between 2 ranks on loopback (gloo), median of 2000:")
        for name, us in json.loads((out / "allreduce.json").read_text()).items():
            print(f"  {name:<20} {us:8.1f} us")

        gpt2 = str(gpt2_folder(out / "gpt2"))
        runs = [("gpt2 1x1", gpt2, 1, 1), ("gpt2 1x2", gpt2, 1, 2), ("gpt2 2x1", gpt2, 2, 1)]
        if not args.skip_smollm2:
            from tinyformers.loading.hub import default_model

            smollm2 = str(default_model())
            runs += [("smollm2 1x1", smollm2, 1, 1), ("smollm2 3x1", smollm2, 3, 1)]
        print("\nmodel        ranks x threads   decode tok/s   weights/rank MB   peak RSS grew MB")
        for tag, path, world, threads in runs:
            tokens = "0" if tag.startswith("smollm2") else str(args.tokens)  # memory only
            rank_args = ["--tokens", tokens, "--rounds", str(args.rounds), "--rank", "model"]
            launch(world, [*rank_args, path, tmp, tag, str(threads)], threads=threads)
            r = report(out, tag, world)
            speed = f"{r['tok_s']:.1f}" if r["tok_s"] else "-"
            print(
                f"{tag.split()[0]:<12} {world} x {threads:<15} {speed:>12} "
                f"{r['weights'] / 2**20:>17.0f} {r['grew_mb']:>18.0f}"
            )
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
