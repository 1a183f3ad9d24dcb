"""Tensor parallel measured, term by term, beside the cost model (docs/distributed.md).

    python -m benchmarks.distributed [--tokens 128] [--skip-memory]
    python -m benchmarks.distributed --netns [--rates 10gbit,1gbit,100mbit]

Every rank runs 1 thread. GPT-2 124M (the real shape, random weights, float32 on our kernels)
decodes `--tokens` greedy tokens after an 8-token prompt through the CLI under torchrun, with
TINYFORMERS_TP_TIMES set, so each rank reports per decode step: its forward, the all-reduces
and the all-gather inside it, and the broadcasts of the mirror protocol; compute is the
forward less its collectives.

Beside it, each term measured alone: rank 0's shard decoding in one process, no collectives
(compute), and 2000 of each collective (all-reduce [1, 1, C], all-gather [1, 1, V / N], the
header broadcast) between the same ranks. `model()` puts them together into a prediction.

Default: loopback, 1 x 1, 1 x 2 and 1 x 3 (ranks x threads), and the memory of SmolLM2 on 1
and 3 ranks. `--netns`: two network namespaces joined by a veth pair (benchmarks/netns.py,
needs root), its bandwidth shaped by tc at each of `--rates`; the docs' two-node torchrun
command (c10d rendezvous) runs one rank in each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.netns import Host, NamespaceError, parse_rate, two_hosts

PROMPT = "The quick brown fox jumps over the lazy"  # 8 GPT-2 tokens
PORT = 29500


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


# Launching ----------------------------------------------------------------------------------


def torchrun(argv: list[str], world: int, hosts: tuple[Host, ...] | None, env: dict) -> list:
    """`torchrun ... argv` on this machine (`world` processes), or the two-node command of
    docs/distributed.md with one process in each of `hosts`. Returns each launcher's
    (exit code, stdout, stderr); rank 0's output comes through the first."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    run = [sys.executable, "-m", "torch.distributed.run"]
    if hosts is None:
        commands = [[*run, "--standalone", "--nproc-per-node", str(world), *argv]]
        envs = [env]
    else:
        commands, envs = [], []
        for host in hosts:
            rendezvous = [
                "--nnodes", str(len(hosts)), "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{hosts[0].address}:{PORT}",
                "--rdzv-id", "tinyformers",
                # these two only because both namespaces share one host name: which one
                # hosts the rendezvous, and the address the others reach each one at
                "--rdzv-conf", f"is_host={int(host is hosts[0])}", "--local-addr", host.address,
            ]  # fmt: skip
            commands.append(host.command([*run, *rendezvous, *argv]))
            envs.append(dict(env, GLOO_SOCKET_IFNAME=host.interface))
    procs = [
        subprocess.Popen(c, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c, e in zip(commands, envs, strict=True)
    ]
    results = [(p.wait(timeout=900), p.stdout.read(), p.stderr.read()) for p in procs]
    for code, _, err in results:
        if code:
            tail = "\n".join(line for line in err.splitlines() if not line.startswith("W"))
            raise SystemExit(f"torchrun {' '.join(argv[:4])} failed:\n{tail[-3000:]}")
    return results


# Measured on the ranks --------------------------------------------------------------------


def rank_collectives(out: Path, width: int, vocab: int, gap: float) -> None:
    """The mean time of each collective our model runs, on the model's own group
    (parallel.Link), between the ranks torchrun started, each after `gap` seconds of matmuls
    as in a decode step (a rank that computed is no longer first in the CPU's queue when its
    peer's data comes); rank 0 writes them to `out`. The mean, as a step pays every one."""
    import torch

    from tinyformers import parallel

    _, link = parallel.join(torch.device("cpu"))
    part = -(-vocab // link.world)
    gathered = [torch.empty(1, 1, part) for _ in range(link.world)]
    x, w = torch.randn(1, width), torch.randn(width, width)
    cases = {
        "all-reduce": lambda: link.all_reduce(torch.randn(1, 1, width)),
        "all-gather": lambda: link.all_gather(gathered, torch.randn(1, 1, part)),
        "broadcast": lambda: link.broadcast(torch.zeros(20, dtype=torch.long)),
    }
    means = {}
    for name, run in cases.items():
        for _ in range(100):  # warm-up: connections, buffers
            run()
        total = 0.0
        for _ in range(1000):
            end = time.perf_counter() + gap
            while time.perf_counter() < end:
                torch.mm(x, w)  # a decode step's matmul
            start = time.perf_counter()
            run()
            total += time.perf_counter() - start
        means[name] = total / 1000
    if link.rank == 0:
        (out / "collectives.json").write_text(json.dumps(means))


def shard_alone(path: str, world: int, tokens: int) -> dict:
    """Seconds per decode step of rank 0's shard of a `world`-rank split, run alone in a
    process of its own (no collectives): `tinyformers.load`'s own path with no group.
    "wall": the median step; "rest": what generate adds to a step (sampling, the loop), timed
    just after in the same process; "cpu": the process's CPU time per step, what it costs
    when it has the core to itself (a rank of a run does: it sleeps in each collective and
    wakes ahead of the CPU-bound jobs that share the cores, while a process that never
    sleeps gets its fair share of them)."""
    argv = [sys.executable, "-m", "benchmarks.distributed", "--tokens", str(tokens)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([*argv, "--rank", "alone", path, str(world)], env=env, check=True,
                          capture_output=True, text=True)  # fmt: skip
    return json.loads(done.stdout)


def rank_alone(path: str, world: int, tokens: int) -> dict:
    """`shard_alone`, in the process it started."""
    from unittest import mock

    import torch

    import tinyformers
    from tinyformers import parallel

    with (
        mock.patch.object(parallel, "join", lambda device: (parallel.Shard(0, world), None)),
        mock.patch.object(parallel, "start", lambda net, shard, link, config: net),
    ):
        model = tinyformers.load(path, threads=1, tensor_parallel=world > 1)
    net = model.net
    total = 8 + tokens
    mask = torch.ones(1, total, dtype=torch.long)
    with torch.inference_mode():
        cache = net.make_cache(1, total)
        net(torch.arange(100, 108)[None], mask, cache=cache, input_pos=torch.arange(8))
        times, cpu = [], time.process_time()
        for step in range(tokens):
            token, pos = torch.tensor([[100 + step]]), torch.tensor([8 + step])
            start = time.perf_counter()
            net(token, mask, cache=cache, input_pos=pos, last_only=True)
            times.append(time.perf_counter() - start)
        cpu = (time.process_time() - cpu) / tokens
    # the same steps through generate: what rank 0 adds to each forward (sampling, the loop)
    model.generate_ids(list(range(100, 108)), max_new_tokens=tokens, temperature=0)
    step = 1 / model.last_stats.decode_tokens_per_second
    return {"wall": median(times), "cpu": cpu, "rest": step - sum(times) / tokens}


def decode(path: str, world: int, tokens: int, hosts=None) -> dict:
    """The CLI's greedy decode on `world` ranks: tok/s, and per step each rank's terms (s)."""
    with tempfile.TemporaryDirectory() as times:
        os.chmod(times, 0o777)
        argv = ["-m", "tinyformers", "generate", "--model", path, "-n", str(tokens)]
        argv += ["--temp", "0", "-t", "1", "--verbose", PROMPT]
        if world == 1:
            env = dict(os.environ, OMP_NUM_THREADS="1")
            done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True)
            results, ranks = [(done.returncode, done.stdout, done.stderr)], []
        else:
            results = torchrun(argv, world, hosts, {"TINYFORMERS_TP_TIMES": times})
            ranks = [json.loads(f.read_text()) for f in sorted(Path(times).glob("rank*.json"))]
    speed = re.search(r"decode ([\d.]+) tok/s", results[0][2])
    if not speed:
        raise SystemExit(f"no decode speed in the output of {argv}:\n{results[0][2][-2000:]}")
    terms = []
    for rank in ranks:  # {phase: {kind: [calls, seconds]}}
        steps = rank["decode"]["forward"][0]
        per_step = {kind: seconds / steps for kind, (_, seconds) in rank["decode"].items()}
        collectives = per_step.get("all-reduce", 0) + per_step.get("all-gather", 0)
        per_step["compute"] = per_step.pop("forward") - collectives
        terms.append(per_step)
    return {"tok_s": float(speed.group(1)), "text": results[0][1], "ranks": terms}


# The cost model ---------------------------------------------------------------------------


COLLECTIVES = 2 * 12 + 2  # per decode step of GPT-2: the compute between two is step / this


def model(layers: int, alone: float, rest: float, collectives: dict) -> dict:
    """Seconds per decoded token, term by term:
    compute     rank 0's shard alone, its CPU time (measured);
    all-reduce  2 per layer and 1 for the embedding, each the collective alone (measured
                after as much compute as a step does between two);
    all-gather  1, the logits;
    broadcast   2 from rank 0 (the header, then the ids), each the header's alone;
    rest        rank 0's sampling and loop, as one process has it (its step less its forward).
    """
    terms = {
        "compute": alone,
        "all-reduce": (2 * layers + 1) * collectives["all-reduce"],
        "all-gather": collectives["all-gather"],
        "broadcast": 2 * collectives["broadcast"],
        "rest": rest,
    }
    return {**terms, "total": sum(terms.values())}


def table_row(name: str, measured: dict, predicted: dict) -> str:
    rank0 = measured["ranks"][0] if measured["ranks"] else {}
    ms = [
        f"{rank0.get(kind, 0) * 1e3:.2f} / {predicted[kind] * 1e3:.2f}"
        for kind in ("compute", "all-reduce", "all-gather", "broadcast")
    ]
    speed = f"{measured['tok_s']:.1f} / {1 / predicted['total']:.1f}"
    error = (1 / predicted["total"]) / measured["tok_s"] - 1
    return f"| {name} | {speed} | {error:+.0%} | " + " | ".join(ms) + " |"


HEADER = (
    "| run | tok/s measured / predicted | error | compute ms | all-reduce ms | all-gather ms "
    "| broadcast ms |\n|---|---|---|---|---|---|---|"
)


# On paper: larger worlds and a larger model, from the same terms ------------------------

# (name, weight bytes, layers, hidden size C, vocabulary V, activation bytes)
SHAPES = [
    ("SmolLM2-135M, float32", 538e6, 30, 576, 49152, 4),
    ("Llama-3-8B shape, bfloat16", 16.06e9, 32, 4096, 128256, 2),
]


def paper(bandwidth: float, overhead: float, alpha: float, link: float) -> None:
    """Seconds per token at 2, 8 and 64 ranks, each rank a machine: the terms of `model()`
    written for N ranks. compute: W / (N B) plus `overhead` per layer that does not divide
    (the Python and small ops around each layer's matmuls); a ring all-reduce of C values:
    2 (N - 1) hops of `alpha` and 2 (N - 1) / N of its bytes over `link` bytes/s; the
    all-gather of V / N logits per rank: N - 1 hops and (N - 1) / N of V; the broadcasts:
    2 log2(N) hops of a few bytes."""
    print(f"\non paper: B = {bandwidth / 1e9:g} GB/s per rank, {overhead * 1e6:.0f} µs per layer "
          f"that does not divide, alpha = {alpha * 1e6:.0f} µs per hop, link {link * 8 / 1e9:g} "
          "Gbit/s")  # fmt: skip
    print("| model | ranks | compute ms | all-reduce ms | all-gather ms | broadcast ms | tok/s "
          "| dominant |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for name, weights, layers, width, vocab, size in SHAPES:
        for n in (2, 8, 64):
            terms = {
                "compute": weights / (n * bandwidth) + layers * overhead,
                "all-reduce": (2 * layers + 1)
                * (2 * (n - 1) * alpha + 2 * (n - 1) / n * width * size / link),
                "all-gather": (n - 1) * alpha + (n - 1) / n * vocab * 4 / link,
                "broadcast": 2 * math.log2(n) * alpha,
            }
            ms = " | ".join(f"{t * 1e3:.2f}" for t in terms.values())
            top = max(terms, key=terms.get)
            print(f"| {name} | {n} | {ms} | {1 / sum(terms.values()):.1f} | {top} |")


# The driver -------------------------------------------------------------------------------


def gpt2_folder(folder: Path) -> str:
    """GPT-2 124M with random weights, saved as Hugging Face saves it, with GPT-2's tokenizer."""
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    data = Path(__file__).resolve().parent.parent / "tests" / "data" / "gpt2"
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(data / name, folder / name)
    return str(folder)


def collectives(world: int, hosts, out: Path, gap: float) -> dict:
    """Each collective alone between `world` ranks, after `gap` s of compute (rank_collectives)."""
    argv = ["-m", "benchmarks.distributed", "--rank", "collectives", str(out), str(gap)]
    torchrun(argv, world, hosts, {})
    return json.loads((out / "collectives.json").read_text())


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def measure(path: str, world: int, tokens: int, rounds: int, out: Path, hosts=None) -> tuple:
    """`rounds` rounds of: the TP run, then its collectives alone (after as much compute as
    the run's shard does between two). Returns the run of median speed and each collective's
    median over the rounds: with other jobs on the cores, one round can be twice another."""
    runs, alone = [], []
    for _ in range(rounds):
        runs.append(decode(path, world, tokens, hosts))
        step = median([r["compute"] for r in runs[-1]["ranks"]])
        alone.append(collectives(world, hosts, out, step / COLLECTIVES))
    runs.sort(key=lambda r: r["tok_s"])
    return runs[len(runs) // 2], {k: median([a[k] for a in alone]) for k in alone[0]}


def baseline(path: str, tokens: int, rounds: int) -> tuple[dict, float]:
    """Each world's shard alone (CPU time per step), and rank 0's time per token outside its
    forward (sampling, the loop); medians over `rounds`."""
    runs = {w: [shard_alone(path, w, tokens) for _ in range(rounds)] for w in (1, 2, 3)}
    alone = {w: median([r["cpu"] for r in rs]) for w, rs in runs.items()}
    single = decode(path, 1, tokens)["tok_s"]
    print("shard alone, CPU ms per decode step: " + ", ".join(
        f"{w} rank{'s' * (w > 1)} {t * 1e3:.2f}" for w, t in alone.items()
    ))  # fmt: skip
    rest = median([r["rest"] for r in runs[1]])
    print(f"1 x 1: {single:.1f} tok/s; rank 0's step outside its forward {rest * 1e3:.2f} ms")
    return alone, rest


def loopback(path: str, tokens: int, rounds: int, out: Path) -> None:
    alone, rest = baseline(path, tokens, rounds)
    print(f"\nloopback (gloo on 127.0.0.1), GPT-2 124M, {tokens} tokens\n{HEADER}")
    for world in (2, 3):
        measured, collective = measure(path, world, tokens, rounds, out)
        predicted = model(12, alone[world], rest, collective)
        print(table_row(f"1 x {world}", measured, predicted), flush=True)
        print_ranks(measured, collective)


def shaped(path: str, tokens: int, rounds: int, rates: list[str], out: Path) -> None:
    alone, rest = baseline(path, tokens, rounds)
    print(f"\ntwo namespaces over a veth pair, shaped by tc tbf; GPT-2 124M, {tokens} tokens")
    print(HEADER)
    for rate in rates:
        with two_hosts(rate) as hosts:
            measured, collective = measure(path, 2, tokens, rounds, out, hosts)
        predicted = model(12, alone[2], rest, collective)
        bits = parse_rate(rate)
        print(table_row(f"2 hosts x 1, {bits / 1e9:g} Gbit/s", measured, predicted), flush=True)
        print_ranks(measured, collective)


def print_ranks(measured: dict, alone: dict) -> None:
    """Each rank's measured terms, and the collectives measured alone (µs)."""
    for rank, terms in enumerate(measured["ranks"]):
        parts = ", ".join(f"{kind} {seconds * 1e3:.2f}" for kind, seconds in terms.items())
        print(f"    rank {rank} per step, ms: {parts}")
    print("    alone, µs: " + ", ".join(f"{k} {v * 1e6:.0f}" for k, v in alone.items()))


def memory(out: Path) -> None:
    """Peak RSS over the start of each rank of SmolLM2 (GGUF) loaded on 1 and 3 ranks."""
    from tinyformers.loading.hub import default_model

    print("\nSmolLM2-135M (GGUF) loaded, the largest rank: ranks, weights MB, peak RSS grew MB")
    for world in (1, 3):
        argv = ["-m", "benchmarks.distributed", "--rank", "memory", str(default_model()), str(out)]
        if world == 1:
            subprocess.run([sys.executable, *argv], check=True)
        else:
            torchrun(argv, world, None, {})
        ranks = [json.loads((out / f"memory{r}.json").read_text()) for r in range(world)]
        grew = max(r["peak"] - r["before"] for r in ranks) / 2**20
        print(f"  {world}: {ranks[0]['weights'] / 2**20:.0f} MB, {grew:.0f} MB")  # rank 0's
        for f in out.glob("memory*.json"):
            f.unlink()


def rank_memory(path: str, out: Path) -> None:
    import atexit

    before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    rank = int(os.environ.get("RANK", "0"))
    weights = []

    def report() -> None:  # at exit: the ranks other than 0 leave from inside `load`
        status = Path("/proc/self/status").read_text()  # VmHWM: ru_maxrss spans exec
        peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
        record = {"before": before, "peak": peak, "weights": sum(weights)}
        (out / f"memory{rank}.json").write_text(json.dumps(record))

    atexit.register(report)
    import tinyformers

    model = tinyformers.load(path, threads=1, tensor_parallel="WORLD_SIZE" in os.environ)
    weights.append(sum(t.nbytes for t in [*model.net.parameters(), *model.net.buffers()]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="medians over this many rounds")
    p.add_argument("--netns", action="store_true", help="two namespaces over a shaped link")
    p.add_argument("--rates", default="10gbit,1gbit,100mbit", help="tc rates for --netns")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument(
        "--paper",
        nargs=4,
        type=float,
        metavar=("GB_S", "LAYER_US", "HOP_US", "GBIT_S"),
        help="only the on-paper table: memory bandwidth per rank, the per-layer time that "
        "does not divide, the latency of one hop and the link's bandwidth",
    )
    p.add_argument("--rank", nargs="*", help=argparse.SUPPRESS)  # what a rank runs
    args = p.parse_args()
    if args.rank:
        role, *rest = args.rank
        if role == "collectives":
            return rank_collectives(Path(rest[0]), 768, 50257, float(rest[1]))
        if role == "alone":
            return print(json.dumps(rank_alone(rest[0], int(rest[1]), args.tokens)))
        return rank_memory(rest[0], Path(rest[1]))
    if args.paper:
        bandwidth, overhead, alpha, link = args.paper
        return paper(bandwidth * 1e9, overhead * 1e-6, alpha * 1e-6, link * 1e9 / 8)
    print(f"{cpu_name()}, {len(os.sched_getaffinity(0))} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the start")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        os.chmod(tmp, 0o777)
        path = gpt2_folder(out / "gpt2")
        if args.netns:
            try:
                shaped(path, args.tokens, args.rounds, args.rates.split(","), out)
            except NamespaceError as e:
                raise SystemExit(f"--netns: {e} (it needs root: ip netns, veth, tc tbf)") from None
        else:
            loopback(path, args.tokens, args.rounds, out)
            if not args.skip_memory:
                memory(out)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
