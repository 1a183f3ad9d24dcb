"""Pack a weight once at load into the layout its kernel streams, then multiply by it.

Layouts (gemv.cpp has the picture): blocks of 32 output rows (16 for int8) stored as one
contiguous stream each; N is padded with zero rows to whole blocks, K to the format's step.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import TinyformersError
from .build import load_ops

FORMATS = ("f32", "bf16", "int8")
BLOCK = {"f32": 32, "bf16": 32, "int8": 16}  # output rows per block


class PackedWeight(nn.Module):
    """A weight [N, K] in a kernel's blocked layout; its tensors are buffers, so `.to()` and
    `state_dict()` work. `dense()` gives the [N, K] matrix back (to re-pack or to check)."""

    def __init__(
        self,
        fmt: str,
        n: int,
        k: int,
        data: Tensor,
        scales: Tensor | None = None,
        group_size: int = 0,
    ) -> None:
        super().__init__()
        self.fmt, self.n, self.k, self.group_size = fmt, n, k, group_size
        self.register_buffer("data", data)
        self.register_buffer("scales", scales)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.fmt == "int8" else ""
        return f"{self.fmt}, n={self.n}, k={self.k}{group}"

    def dense(self) -> Tensor:
        """[N, K] float32: the weight exactly as the kernel sees it (dequantised for int8)."""
        nb, nk = self.data.shape[0] * BLOCK[self.fmt], self.data.shape[1]
        if self.fmt == "f32":  # [nb/32, K, 32] -> [nb, K]
            w = self.data.transpose(1, 2).reshape(nb, nk)
        elif self.fmt == "bf16":  # [nb/32, Kp/2, 32, 2] -> [nb, Kp]
            w = self.data.permute(0, 2, 1, 3).reshape(nb, nk * 2).float()
        else:  # [nb/16, Kp/4, 16, 4] uint8 (w + 128), scales [nb/16, Kp/G, 16] -> [nb, Kp]
            q = self.data.permute(0, 2, 1, 3).reshape(nb, nk * 4).float() - 128
            s = self.scales.permute(0, 2, 1).reshape(nb, -1).float()
            w = q * s.repeat_interleave(self.group_size, dim=1)
        return w[: self.n, : self.k]


def _pad(t: Tensor, rows: int, cols: int) -> Tensor:
    """Zero-pad a 2-D tensor at the end up to multiples of rows and cols."""
    return F.pad(t, (0, -t.shape[1] % cols, 0, -t.shape[0] % rows))


def quantize_int8(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per group of G columns, as GGUF Q8_0 does for G = 32: d = max|w| / 127,
    q = round(w / d) with ties away from zero. Returns q [N, Kp] int8 and d [N, Kp/G] float16,
    K zero-padded to Kp, a multiple of G."""
    w = _pad(weight.float(), 1, group_size)
    blocks = w.view(w.shape[0], -1, group_size)  # (N, Kp/G, G)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    a = (blocks * torch.where(d == 0, 0.0, 1 / d)).abs()  # subtle: ggml multiplies by 1/d
    # subtle: floor(a + 0.5) rounds 0.49999997 up (the sum rounds to 1.0); ggml's roundf does not
    q = blocks.sign() * (a.floor() + (2 * (a - a.floor())).floor())
    return q.to(torch.int8).view_as(w), d.squeeze(-1).half()


def _check(fmt: str, group_size: int) -> None:
    if fmt not in FORMATS:
        raise TinyformersError(f"kernels.pack: format {fmt!r} is not one of {FORMATS}")
    if fmt == "int8" and (group_size <= 0 or group_size % 4):
        raise TinyformersError(
            f"kernels.pack: int8 group_size {group_size} must be a positive "
            "multiple of 4 (vpdpbusd reads 4 columns at once)"
        )


def pack(weight: Tensor, fmt: str, *, group_size: int = 32) -> PackedWeight:
    """Repack (and for int8, quantise) a weight [N, K] for `linear`.

    fmt: "f32", "bf16" (rounded to nearest even) or "int8" (one fp16 scale per group_size
    input columns; 32 = GGUF Q8_0, K = per output channel).
    Example: w = pack(layer.weight, "int8"); y = linear(x, w, layer.bias)
    """
    n, k = weight.shape
    _check(fmt, group_size)
    if fmt == "int8":
        q, scales = quantize_int8(weight, group_size)
        return _pack_int8(q, scales, k)
    step = 1 if fmt == "f32" else 2
    w = _pad(weight.to(torch.float32 if fmt == "f32" else torch.bfloat16), 32, step)
    blocks = w.view(w.shape[0] // 32, 32, w.shape[1] // step, step)  # (N/32, 32, K/step, step)
    data = blocks.permute(0, 2, 1, 3).contiguous()  # (N/32, K/step, 32, step)
    return PackedWeight(fmt, n, k, data.squeeze(-1) if fmt == "f32" else data)


def pack_quantized(q: Tensor, scales: Tensor) -> PackedWeight:
    """Pack int8 weights that are already quantised, without requantising: q [N, K] int8 and
    scales [N, K/G] (GGUF Q8_0 blocks give G = 32). Scales are stored as float16."""
    n, k = q.shape
    group_size = k // scales.shape[1]
    if q.dtype != torch.int8 or scales.shape[0] != n or group_size * scales.shape[1] != k:
        raise TinyformersError(
            f"kernels.pack_quantized: q {tuple(q.shape)} {q.dtype} and scales "
            f"{tuple(scales.shape)} are not int8 [N, K] and [N, K/G]"
        )
    _check("int8", group_size)
    return _pack_int8(q, scales.half(), k)


def _pack_int8(q: Tensor, scales: Tensor, k: int) -> PackedWeight:
    n, kp = q.shape
    group_size = kp // scales.shape[1]
    u8 = (_pad(q, 16, 1).to(torch.int16) + 128).to(torch.uint8)  # vpdpbusd wants unsigned w
    data = u8.view(-1, 16, kp // 4, 4).permute(0, 2, 1, 3).contiguous()  # (N/16, Kp/4, 16, 4)
    s = _pad(scales, 16, 1).view(-1, 16, kp // group_size).transpose(1, 2).contiguous()
    return PackedWeight("int8", n, k, data, s, group_size)


def linear(x: Tensor, w: PackedWeight, bias: Tensor | None = None) -> Tensor:
    """y = x @ W^T (+ bias): x [..., K] -> y [..., N] in x's dtype.

    Runs the kernel on CPU tensors when it is available (computing in float32), torch's
    F.linear on the dense weight otherwise (CUDA, autograd, no kernels).
    """
    # subtle: this runs ~200 times per token for a small model, so every check here is a cheap
    # one (views are made in C++, buffers read without nn.Module.__getattr__).
    ops = load_ops()[0]
    if ops is None or not x.is_cpu or (x.requires_grad and torch.is_grad_enabled()):
        return F.linear(x, w.dense().to(x.dtype), bias)
    if x.shape[-1] != w.k:
        raise RuntimeError(f"kernels.linear: x has {x.shape[-1]} columns, the weight {w.k}")
    x32 = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    buffers = w._buffers
    if w.fmt == "f32":
        y = ops.gemv_f32(x32, buffers["data"], bias, w.n)
    elif w.fmt == "bf16":
        y = ops.gemv_bf16(x32, buffers["data"], bias, w.n)
    else:
        y = ops.gemv_int8(x32, buffers["data"], buffers["scales"], bias, w.n, w.group_size)
    return y if x.dtype == torch.float32 else y.to(x.dtype)
