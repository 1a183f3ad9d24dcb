"""Which matmul runs a packed weight's multi-row passes (prefill): our kernel or torch's.

Our kernels beat torch's GEMM on Zen 4, but on a Xeon with AMX torch's oneDNN bf16 matmul
runs a 128-token prefill ~3x faster. Which one wins depends on the machine, its load and the
shape, not on a CPU name, so `pack_model` times both once per (format, N, K) at load and keeps
a dense copy in torch's layout only where torch is MARGIN faster. Decode rows (up to
`fused.ATTEND_ROWS`) always run ours: there the weight's bytes, not the FLOPs, set the time.

TINYFORMERS_PREFILL=measure (default), ours or torch forces the choice (tests, or a machine
whose measurement you do not trust).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import TinyformersError
from .build import load_ops
from .packed import BLOCK, PackedWeight, linear

MODES = ("measure", "ours", "torch")
# Formats that torch multiplies at their own dtype. int8 and q4 have none: a dense copy that
# is the same weight needs float32 (4x int8's bytes, 7x q4's), a bf16 one rounds it again.
DENSE = {"f32": torch.float32, "bf16": torch.bfloat16}
ROWS = 128  # the timed input: a typical prompt
TIMED_ROWS = 4096  # a taller matrix (lm_head) is timed on its first rows: time grows with N
REPS = 4  # runs of each, interleaved, best of: the first also warms oneDNN's primitive cache
MARGIN = 1.15  # torch must be this much faster: less is within a shared machine's noise


@dataclass(frozen=True)
class Choice:
    """The kernel of a weight's multi-row passes, why, and the timings it rests on (ms)."""

    kernel: str  # "ours" or "torch"
    why: str
    ours_ms: float | None = None
    torch_ms: float | None = None


def mode() -> str:
    """TINYFORMERS_PREFILL, checked: "measure" (default), "ours" or "torch"."""
    value = os.environ.get("TINYFORMERS_PREFILL", "measure")
    if value not in MODES:
        raise TinyformersError(f"TINYFORMERS_PREFILL={value!r}: expected ours, torch or measure")
    return value


def choose(w: PackedWeight, how: str) -> Choice | None:
    """The kernel for `w`'s multi-row passes under mode `how`; None where no choice is made:
    off the CPU (meta, CUDA) or without the kernels, `linear` runs torch's F.linear anyway."""
    if w.data.device.type != "cpu" or load_ops()[0] is None:
        return None
    if w.fmt not in DENSE:
        return Choice("ours", f"{w.fmt}: torch has no matmul at this dtype")
    if how != "measure":
        return Choice(how, f"TINYFORMERS_PREFILL={how}")
    ours_ms, torch_ms = time_both(w)
    if ours_ms >= MARGIN * torch_ms:
        # A dense copy costs memory: time again (best of both rounds), so that one busy spell
        # of a shared machine that slowed only our runs does not decide.
        again = time_both(w)
        ours_ms, torch_ms = min(ours_ms, again[0]), min(torch_ms, again[1])
    kernel = "torch" if ours_ms >= MARGIN * torch_ms else "ours"
    return Choice(kernel, f"measured at load, {ROWS} rows", ours_ms, torch_ms)


def time_both(w: PackedWeight, rows: int = ROWS) -> tuple[float, float]:
    """Best-of-REPS milliseconds of our kernel and of `torch_linear` for x [rows, K] @ w^T.

    The runs alternate, so that a busy spell on a shared machine slows both alike.
    """
    if w.n > TIMED_ROWS:  # the first TIMED_ROWS output rows: whole blocks, a view of the data
        w = PackedWeight(w.fmt, TIMED_ROWS, w.k, w.data[: TIMED_ROWS // BLOCK[w.fmt]])
    dense = w.unpacked()  # [N, K] as torch wants it
    x = torch.randn(rows, w.k)
    best = [math.inf, math.inf]
    with torch.inference_mode():
        for _ in range(REPS):
            for i, run in enumerate((lambda: linear(x, w), lambda: torch_linear(x, dense))):
                start = time.perf_counter()
                run()
                best[i] = min(best[i], time.perf_counter() - start)
    return best[0] * 1e3, best[1] * 1e3


def torch_linear(x: Tensor, dense: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ dense^T (+ bias) by torch's matmul (oneDNN; AMX where the CPU has it), in x's dtype.

    subtle: a bf16 weight multiplies x rounded to bf16 (as our kernel does) and torch's CPU
    matmul returns bf16 (no float32 output), so each output is rounded to bf16 as well; the
    bias is added after, in x's dtype, unrounded.
    """
    y = F.linear(x.to(dense.dtype), dense).to(x.dtype)  # [..., K] -> [..., N]
    return y if bias is None else y.add_(bias)
