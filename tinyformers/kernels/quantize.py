"""Weight quantisers that reproduce GGUF's own, bit for bit: Q8_0 (int8) and Q4_1 (q4).

Both work on groups of input columns of each output row; K is zero-padded to whole groups.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def pad(t: Tensor, rows: int, cols: int) -> Tensor:
    """Zero-pad a 2-D tensor at the end up to multiples of rows and cols."""
    return F.pad(t, (0, -t.shape[1] % cols, 0, -t.shape[0] % rows))


def _groups(weight: Tensor, group_size: int) -> Tensor:
    w = pad(weight.float(), 1, group_size)
    return w.view(w.shape[0], -1, group_size)  # (N, Kp/G, G)


def _inverse(d: Tensor) -> Tensor:
    return torch.where(d == 0, 0.0, 1 / d)  # subtle: ggml multiplies by 1/d, never divides by d


def quantize_int8(weight: Tensor, group_size: int = 32) -> tuple[Tensor, Tensor]:
    """Symmetric int8, as GGUF Q8_0 for G = 32: d = max|w| / 127, q = round(w / d), ties
    away from zero. Returns q [N, Kp] int8 and d [N, Kp/G] float16."""
    blocks = _groups(weight, group_size)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    a = (blocks * _inverse(d)).abs()
    # subtle: floor(a + 0.5) rounds 0.49999997 up (the sum rounds to 1.0); ggml's roundf does not
    q = blocks.sign() * (a.floor() + (2 * (a - a.floor())).floor())
    return q.to(torch.int8).flatten(1), d.squeeze(-1).half()


def quantize_q4(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 4-bit per 32 columns, as GGUF Q4_1: w ~= d * q + m with m = min(w),
    d = (max(w) - m) / 15, q in 0..15. Returns q [N, Kp] uint8, d and m [N, Kp/32] float16."""
    blocks = _groups(weight, 32)
    lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    q = ((blocks - lo) * _inverse(d) + 0.5).trunc().clamp(0, 15)
    return q.to(torch.uint8).flatten(1), d.squeeze(-1).half(), lo.squeeze(-1).half()
