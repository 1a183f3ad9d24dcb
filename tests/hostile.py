"""The shared runner for hostile-input tests: each case runs in a fresh Python, timed and with
its peak memory measured, so a test can assert the promise of docs/robustness.md: one error of
a named class, within a second, within 100 MB over the memory before the case.

torch and tinyformers are imported (and `setup` is run) before any case starts: their cost is
not the case's. Peak memory is the kernel's high-water mark (VmHWM), reset before each case
through /proc/self/clear_refs, so it counts torch's allocations as well as Python's.

Example:
    results = run_cases({"deep": "read_json(Path('deep.json'))"}, setup="from ... import ...")
    assert_refused(results["deep"], CheckpointError, "nested too deeply")
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SECONDS = 1.0
MEGABYTES = 100

_CHILD = r"""
import gc, json, re, signal, sys, time, traceback
import torch, tinyformers  # imported before the clock starts
from pathlib import Path

def status(key):
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith(key)).split()[1]) // 1024  # MB

def on_alarm(signum, frame):
    raise TimeoutError("the case ran past the runner's alarm")

signal.signal(signal.SIGALRM, on_alarm)
cases, setup, alarm = json.loads(sys.stdin.read())
namespace = {"Path": Path, "torch": torch, "tinyformers": tinyformers}
exec(setup, namespace)
for name, code in cases.items():
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    before = status("VmRSS:")
    error = message = None
    signal.alarm(alarm)
    start = time.perf_counter()
    try:
        exec(code, dict(namespace))
    except BaseException as e:
        error, message = type(e).__name__, str(e)
        where = traceback.extract_tb(e.__traceback__)[-1]
        message += f"  [raised at {where.filename}:{where.lineno}]"
    seconds = time.perf_counter() - start
    signal.alarm(0)
    peak = status("VmHWM:") - before
    print(json.dumps({"name": name, "error": error, "message": message,
                      "seconds": seconds, "megabytes": peak}), flush=True)
"""


def run_cases(cases: dict[str, str], setup: str = "", alarm: int = 20) -> dict[str, dict]:
    """Run each snippet of `cases` in one child Python, in order; results by case name.

    Each result: error (the class name raised, or None), message, seconds, megabytes.
    """
    payload = json.dumps(
        [{k: textwrap.dedent(v) for k, v in cases.items()}, textwrap.dedent(setup), alarm]
    )
    done = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=payload,
        capture_output=True,
        text=True,
        timeout=60 + alarm * len(cases),
    )
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith('{"name"'):
            result = json.loads(line)
            results[result["name"]] = result
    if missing := [name for name in cases if name not in results]:
        raise AssertionError(f"cases {missing} gave no result; stderr:\n{done.stderr[-3000:]}")
    return results


def assert_refused(
    result: dict,
    error: type[Exception],
    match: str = "",
    seconds: float = SECONDS,
    megabytes: float = MEGABYTES,
) -> None:
    """The case raised `error` (by class name) with `match` in its message, in time and memory."""
    import re

    assert result["error"] == error.__name__, f"{result['name']}: {result}"
    assert re.search(match, result["message"]), f"{result['name']}: {result['message']}"
    assert_bounded(result, seconds, megabytes)


def assert_bounded(result: dict, seconds: float = SECONDS, megabytes: float = MEGABYTES) -> None:
    assert result["seconds"] <= seconds, f"{result['name']}: {result['seconds']:.2f} s"
    assert result["megabytes"] <= megabytes, f"{result['name']}: {result['megabytes']} MB"


def tiny_gpt2_weights(vocab: int, c: int, n_positions: int, n_layer: int = 1) -> dict:
    """Random GPT-2 weights in our own names (they load through `sanitize` unchanged)."""
    import torch

    w = {"wte.weight": torch.randn(vocab, c), "wpe.weight": torch.randn(n_positions, c)}
    w |= {"ln_f.weight": torch.ones(c), "ln_f.bias": torch.zeros(c)}
    for i in range(n_layer):
        for name, shape in {
            "ln_1.weight": (c,), "ln_1.bias": (c,), "ln_2.weight": (c,), "ln_2.bias": (c,),
            "attn.c_attn.weight": (c, 3 * c), "attn.c_attn.bias": (3 * c,),
            "attn.c_proj.weight": (c, c), "attn.c_proj.bias": (c,),
            "mlp.c_fc.weight": (c, 4 * c), "mlp.c_fc.bias": (4 * c,),
            "mlp.c_proj.weight": (4 * c, c), "mlp.c_proj.bias": (c,),
        }.items():  # fmt: skip
            w[f"h.{i}.{name}"] = torch.randn(shape)
    return w
