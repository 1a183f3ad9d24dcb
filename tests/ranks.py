"""Ranks for the tensor-parallel tests: processes on 127.0.0.1 talking over gloo, started as
torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), one thread each, and the
single-process run they are compared with.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tinyformers

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Once upon a time"
IDS = [[0, 0, 11, 22, 33], [5, 6, 7, 8, 9]]  # two rows, the first left-padded
MASK = [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]

# What each rank runs: the model split across the ranks, loaded with the options in argv[3]
# (JSON); rank 0 saves what it computed, and every rank its peak memory (at exit: the other
# ranks leave from inside `load`).
RANK_SCRIPT = """
import atexit, json, os, sys, torch, tinyformers
from tinyformers import kernels
kernels.available()
path, out, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
rank = int(os.environ["RANK"])
before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def report():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, from the forked pytest process
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    peak = int(status.split()[0]) * 1024
    with open(f"{out}/memory{rank}.json", "w") as f:
        json.dump({"before": before, "peak": peak}, f)
atexit.register(report)
model = tinyformers.load(path, threads=1, tensor_parallel=True, **options)
ids, mask = torch.tensor(IDS), torch.tensor(MASK)
torch.save({
    "logits": model(ids, mask),
    "greedy": model.generate(PROMPT, max_new_tokens=12, temperature=0),
    "seeded": model.generate(PROMPT, max_new_tokens=12, seed=3),
    "weight_bytes": sum(t.nbytes for t in [*model.net.parameters(), *model.net.buffers()]),
}, f"{out}/rank0.pt")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, argv: list[str], timeout: float = 20, stdin: str = "") -> list:
    """`world` processes of `python argv...` as torchrun starts them; rank 0 gets `stdin`."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            TINYFORMERS_TP_TIMEOUT=str(timeout),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, *argv],
                env=env,
                cwd=ROOT,
                stdin=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    procs[0].stdin.write(stdin)
    procs[0].stdin.close()
    procs[0].stdin = None  # closed: communicate() must not flush it
    return procs


def finish(procs: list, timeout: float) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each process; a process still running after `timeout`
    seconds fails the test (and every process is killed), never hangs it."""
    deadline = time.monotonic() + timeout
    try:
        outputs = [p.communicate(timeout=max(0.1, deadline - time.monotonic())) for p in procs]
        return [(p.returncode, *output) for p, output in zip(procs, outputs, strict=True)]
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank was still running after {timeout} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def run_ranks(path: Path, world: int, out: Path, **options) -> dict:
    """What rank 0 of `world` ranks computed (RANK_SCRIPT), `load` given `options`."""
    script = f"IDS, MASK, PROMPT = {IDS}, {MASK}, {PROMPT!r}\n" + RANK_SCRIPT
    procs = launch(world, ["-c", script, str(path), str(out), json.dumps(options)])
    for code, _, err in finish(procs, timeout=120):
        assert code == 0, err[-2000:]
    return torch.load(out / "rank0.pt")


def single_process(path: Path, **options) -> tuple[dict, int]:
    """What RANK_SCRIPT computes, in this process with the model whole; and its weight bytes."""
    model = tinyformers.load(path, threads=1, **options)
    got = {
        "logits": model(torch.tensor(IDS), torch.tensor(MASK)),
        "greedy": model.generate(PROMPT, max_new_tokens=12, temperature=0),
        "seeded": model.generate(PROMPT, max_new_tokens=12, seed=3),
    }
    weights = sum(t.nbytes for t in [*model.net.parameters(), *model.net.buffers()])
    return got, weights
