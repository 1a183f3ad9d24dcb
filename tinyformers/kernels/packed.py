"""Pack a weight once at load into the layout its kernel streams, then multiply by it.

Layouts (gemv.cpp and kquant.cpp have the picture): blocks of 32 output rows (16 for the
quantized formats) stored as one contiguous stream each; N is padded with zero rows to whole
blocks, K to the format's step.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import TinyformersError
from .build import load_ops
from .quantize import pad, quantize_int8, quantize_q4

# kquant.cpp's formats, GGUF's blocks as stored: (bit planes above the nibble, scale dtype,
# scales per group of 32 columns, offset subtracted from q); its kernel's kind is the index
KQUANT = {
    "q5_0": (1, torch.float16, 1, 16),  # w = d * (q - 16)
    "q5_1": (1, torch.float16, 2, 0),  # w = d * q + m
    "q4_k": (0, torch.float32, 2, 0),  # w = (d * scale) * q - dmin * min, per 32
    "q5_k": (1, torch.float32, 2, 0),
    "q6_k": (2, torch.float32, 2, 32),  # w = (d * scale) * (q - 32), a scale per 16
}
FORMATS = ("f32", "bf16", "int8", "q4")  # what `pack` makes from a float matrix; KQUANT: GGUF only
BLOCK = {"f32": 32, "bf16": 32, "int8": 16, "q4": 16} | dict.fromkeys(KQUANT, 16)  # rows per block
KIND = {fmt: i for i, fmt in enumerate(KQUANT)}  # gemv_kquant's kind argument
# a GGUF block type -> the format that computes on it as stored
FORMAT_OF_GGML = {"Q8_0": "int8", "Q4_0": "q4", "Q4_1": "q4"} | {f.upper(): f for f in KQUANT}


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
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"{self.fmt}, n={self.n}, k={self.k}{group}"

    def dense(self) -> Tensor:
        """[N, K] float32: the weight exactly as the kernel sees it (dequantised if quantised)."""
        return self.rows(torch.arange(self.n, device=self.data.device))

    def unpacked(self) -> Tensor:
        """[N, K] in the stored dtype, f32 or bf16 (no float32 copy of a bf16 weight on the
        way): the weight in torch's layout, for torch's matmul (choose.py)."""
        assert self.fmt in ("f32", "bf16"), self.fmt
        nb, ks, step = self.data.shape[0], self.data.shape[1], self.data.dim() - 2
        blocks = self.data.view(nb, ks, 32, step).transpose(1, 2)  # (N/32, 32, K/step, step)
        return blocks.reshape(nb * 32, ks * step)[: self.n, : self.k].contiguous()

    def rows(self, ids: Tensor) -> Tensor:
        """Rows `ids` of the weight as [..., K] float32: an embedding lookup for a tied lm_head.

        Example: PackedWeight of wte [V, C], ids [B, T] -> [B, T, C]
        """
        block, r = ids // BLOCK[self.fmt], ids % BLOCK[self.fmt]  # where each row sits
        # subtle: advanced indices split by a slice put the index dims first: (..., rest)
        if self.fmt == "f32":  # data (N/32, K, 32)
            w = self.data[block, :, r]
        elif self.fmt == "bf16":  # data (N/32, Kp/2, 32, 2)
            w = self.data[block, :, r, :].flatten(-2).float()
        elif (
            self.fmt == "int8"
        ):  # data (N/16, Kp/4, 16, 4) holding w + 128; scales (N/16, Kp/G, 16)
            q = self.data[block, :, r, :].flatten(-2).float() - 128
            w = q * self.scales[block, :, r].float().repeat_interleave(self.group_size, dim=-1)
        elif self.fmt == "q4":  # data (N/16, Kp/32, 4, 16, 4), byte j = quads j and j + 4
            nibbles = self.data[block, :, :, r, :]  # (..., Kp/32, 4, 4)
            q = torch.stack([nibbles & 15, nibbles >> 4], dim=-3).flatten(-4).float()
            d, m = self.scales[block, :, :, r].float().repeat_interleave(32, dim=-2).unbind(-1)
            w = q * d + m
        else:  # kquant: whole blocks decoded once each (dense() asks for every row of each)
            blocks, where = block.unique(return_inverse=True)
            w = _kq_dense(self.fmt, self.data[blocks], self.scales[blocks])[where, r]
        return w[..., : self.k]


def _check(fmt: str, group_size: int) -> None:
    if fmt not in FORMATS:
        raise TinyformersError(f"kernels.pack: format {fmt!r} is not one of {FORMATS}")
    if fmt == "int8" and (group_size <= 0 or group_size % 4):
        raise TinyformersError(
            f"kernels.pack: int8 group_size {group_size} must be a positive "
            "multiple of 4 (vpdpbusd reads 4 columns at once)"
        )
    if fmt == "q4" and group_size != 32:
        raise TinyformersError(f"kernels.pack: q4 group_size is 32 (GGUF's), not {group_size}")


def pack(weight: Tensor, fmt: str, *, group_size: int = 32) -> PackedWeight:
    """Repack (and for int8 and q4, quantise) a weight [N, K] for `linear`.

    fmt: "f32"; "bf16" (rounded to nearest even); "int8" (GGUF Q8_0's rounding, one fp16 scale
    per group_size input columns: 32 = Q8_0, K = per output channel); "q4" (GGUF Q4_1's).
    Example: w = pack(layer.weight, "int8"); y = linear(x, w, layer.bias)
    """
    n, k = weight.shape
    _check(fmt, group_size)
    if fmt == "int8":
        return _pack_int8(*quantize_int8(weight, group_size), k)
    if fmt == "q4":
        return _pack_q4(*quantize_q4(weight), k)
    step = 1 if fmt == "f32" else 2
    dtype = torch.float32 if fmt == "f32" else torch.bfloat16
    nb, kp = -(-n // 32), -(-k // step) * step  # whole blocks of rows, whole steps of columns
    # subtle: written block by block straight into the packed buffer; padding and permuting the
    # whole matrix would hold two extra copies of it (the 50257-row lm_head: 300 MB) at once.
    data = torch.zeros(nb, kp // step, 32, step, dtype=dtype)  # (N/32, K/step, 32, step)
    for b in range(0, nb, 64):
        rows = weight[b * 32 : (b + 64) * 32].to(dtype)  # up to 64 blocks of 32 rows
        rows = pad(rows, 32, step).view(-1, 32, kp // step, step)  # (blocks, 32, K/step, step)
        data[b : b + rows.shape[0]] = rows.permute(0, 2, 1, 3)
    return PackedWeight(fmt, n, k, data.squeeze(-1) if fmt == "f32" else data)


def pack_quantized(
    q: Tensor, scales: Tensor, mins: Tensor | None = None, *, ggml_type: str | None = None
) -> PackedWeight:
    """Pack GGUF-style quantised weights as they are, without requantising.

    int8: q [N, K] int8, scales [N, K/G] (Q8_0: G = 32).
    q4: q [N, K] uint8 in 0..15, scales and mins [N, K/32], w = scales * q + mins
    (Q4_1 as stored; Q4_0 is mins = -8 * scales). Scales and mins are stored as float16.
    ggml_type "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K": the parts of
    `loading.ggml_quants.kquant_split`, packed for kquant.cpp (format: the type in lower case).
    """
    fmt = FORMAT_OF_GGML.get(ggml_type or "")
    if fmt in KQUANT:
        return _pack_kq(fmt, q, scales, mins)
    n, k = q.shape
    want = torch.int8 if mins is None else torch.uint8
    group_size = k // max(scales.shape[-1], 1)
    shapes = [scales.shape] + ([] if mins is None else [mins.shape])
    if q.dtype != want or any(s != (n, k // group_size) for s in shapes) or k % group_size:
        raise TinyformersError(
            f"kernels.pack_quantized: q {tuple(q.shape)} {q.dtype}, scales {tuple(scales.shape)}"
            f" do not fit {want} [N, K] and [N, K/G]"
        )
    _check("int8" if mins is None else "q4", group_size)
    if mins is None:
        return _pack_int8(q, scales.half(), k)
    return _pack_q4(q, scales.half(), mins.half(), k)


def _pack_int8(q: Tensor, scales: Tensor, k: int) -> PackedWeight:
    n, kp = q.shape
    group_size = kp // scales.shape[1]
    u8 = (pad(q, 16, 1).to(torch.int16) + 128).to(torch.uint8)  # vpdpbusd wants unsigned w
    data = u8.view(-1, 16, kp // 4, 4).permute(0, 2, 1, 3).contiguous()  # (N/16, Kp/4, 16, 4)
    s = pad(scales, 16, 1).view(-1, 16, kp // group_size).transpose(1, 2).contiguous()
    return PackedWeight("int8", n, k, data, s, group_size)


def _pack_q4(q: Tensor, d: Tensor, m: Tensor, k: int) -> PackedWeight:
    n, kp = q.shape
    q = pad(q, 16, 1).view(-1, 16, kp // 32, 2, 4, 4)  # (N/16, 16, groups, half, quad, 4)
    nibbles = q[:, :, :, 0] | (q[:, :, :, 1] << 4)  # quads 0-3 low, quads 4-7 high
    data = nibbles.permute(0, 2, 3, 1, 4).contiguous()  # (N/16, groups, quad, 16, 4)
    dm = torch.stack([pad(d, 16, 1), pad(m, 16, 1)], dim=-1)  # (N, groups, 2)
    scales = dm.view(-1, 16, kp // 32, 2).permute(0, 2, 3, 1).contiguous()  # (N/16, groups, 2, 16)
    return PackedWeight("q4", n, k, data, scales, 32)


def _pack_kq(fmt: str, q: Tensor, scales: Tensor, mins: Tensor | None) -> PackedWeight:
    planes, dtype, per_group, offset = KQUANT[fmt]
    n, k = q.shape
    want = (n, k // 32 * (1 if offset == 0 else per_group))  # Q6_K: a scale per 16
    given = [scales.shape] + ([] if mins is None else [mins.shape])
    if q.dtype != torch.uint8 or k % 32 or given != [want] * (2 if offset == 0 else 1):
        raise TinyformersError(
            f"kernels.pack_quantized: {fmt}: q {tuple(q.shape)} {q.dtype}, scales "
            f"{tuple(scales.shape)} do not fit uint8 [N, K] and [N, {want[1]}]"
        )
    nb, groups = -(-n // 16), k // 32
    q = pad(q, 16, 1).view(nb, 16, groups, 2, 4, 4)  # (N/16, row, group, half, quad, 4)
    nibbles = (q[:, :, :, 0] & 15) | ((q[:, :, :, 1] & 15) << 4)  # (N/16, row, group, quad, 4)
    data = [nibbles.permute(0, 2, 3, 1, 4).reshape(nb, groups, 256)]  # (.., quad, row, 4)
    if planes:  # bit 4 + p of each value, as 64-bit masks [quad][half][plane], bit 4 row + c
        bits = torch.stack([(q >> (4 + p)) & 1 for p in range(planes)], dim=-3)
        bits = bits.permute(0, 2, 5, 3, 4, 1, 6).reshape(nb, groups, -1, 8)  # (.., byte, 8 bits)
        data.append((bits << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8))
    parts = [scales] if mins is None else [scales, mins]
    s = torch.stack([pad(p.to(dtype), 16, 1) for p in parts], dim=-1)  # (N, K/G, parts)
    s = s.view(nb, 16, groups, -1).permute(0, 2, 3, 1).contiguous()  # (N/16, groups, S, 16)
    return PackedWeight(fmt, n, k, torch.cat(data, dim=-1), s, 32)  # data (N/16, groups, bytes)


def _kq_dense(fmt: str, data: Tensor, scales: Tensor) -> Tensor:
    """Blocks of a kquant format -> their rows [blocks, 16, Kp] float32, as ggml dequantizes."""
    planes, _, _, offset = KQUANT[fmt]
    nb, groups = data.shape[:2]
    nibbles = data[..., :256].view(nb, groups, 4, 16, 4)  # (.., quad, row, 4)
    q = torch.stack([nibbles & 15, nibbles >> 4], dim=2)  # (.., half, quad, row, 4)
    if planes:
        masks = data[..., 256:].view(
            nb, groups, 4, 2, planes, 8, 1
        )  # (.., quad, half, plane, byte)
        bits = (masks >> torch.arange(8, dtype=torch.uint8)) & 1  # (.., byte, bit)
        bits = bits.view(nb, groups, 4, 2, planes, 16, 4).transpose(2, 3)  # (.., half, quad, ..)
        for p in range(planes):
            q = q | (bits[..., p, :, :] << (4 + p))
    q = q.permute(0, 4, 1, 2, 3, 5).reshape(nb, 16, groups * 32).float()  # (blocks, row, Kp)
    s = scales.float().permute(0, 3, 1, 2)  # (blocks, row, groups, S)
    if fmt == "q6_k":  # a scale per 16 columns
        return (q - offset) * s.reshape(nb, 16, -1).repeat_interleave(16, dim=-1)
    d = s[..., 0].repeat_interleave(32, dim=-1)
    if offset:
        return (q - offset) * d
    return q * d + s[..., 1].repeat_interleave(32, dim=-1)


_OPS: list = []  # the loaded ops, or None: a plain value torch.compile can trace through


def _ops():
    _OPS.append(load_ops()[0])
    return _OPS[0]


def linear(x: Tensor, w: PackedWeight, bias: Tensor | None = None) -> Tensor:
    """y = x @ W^T (+ bias): x [..., K] -> y [..., N] in x's dtype.

    Runs the kernel on CPU tensors when it is available (computing in float32), torch's
    F.linear on the dense weight otherwise (CUDA, autograd, no kernels).
    """
    # subtle: this runs ~200 times per token for a small model, so every check here is a cheap
    # one (views are made in C++, buffers read without nn.Module.__getattr__).
    ops = _OPS[0] if _OPS else _ops()
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or (bias is not None and bias.requires_grad)
    )
    if ops is None or not x.is_cpu or needs_grad:
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
    elif w.fmt == "int8":
        y = ops.gemv_int8(x32, buffers["data"], buffers["scales"], bias, w.n, w.group_size)
    elif w.fmt == "q4":
        y = ops.gemv_q4(x32, buffers["data"], buffers["scales"], bias, w.n)
    else:
        y = ops.gemv_kquant(x32, buffers["data"], buffers["scales"], bias, w.n, KIND[w.fmt])
    return y if x.dtype == torch.float32 else y.to(x.dtype)
