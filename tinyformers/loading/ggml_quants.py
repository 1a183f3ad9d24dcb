"""ggml's tensor encodings: block layouts, and dequantization to float32 in torch.

A quantized row is a run of blocks; each block packs `block_size` weights into `type_size` bytes
(scales first or last, then packed integers). Every decoder below works on all blocks at once:
[n_blocks, type_size] uint8 -> [n_blocks, block_size] float32, no Python loop over blocks.
Bit layouts follow ggml-quants.c (`dequantize_row_*`); the float arithmetic is done in the same
order as gguf-py's numpy decoders (`d * q + m`, scale products first), so results are bit-equal.

Example: dequantize(raw, GGMLType.Q4_1, (576, 576)) -> float32 tensor of shape (576, 576).
"""

from collections.abc import Callable
from enum import IntEnum

import torch

from tinyformers.errors import GGUFError


class GGMLType(IntEnum):
    """ggml's type ids as written in GGUF tensor infos (gaps are ids ggml has retired)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


_T = GGMLType
# type -> (weights per block, bytes per block). Every type ggml knows is listed, so the reader can
# validate sizes in any GGUF file; only the types in _DECODERS can be dequantized.
# fmt: off
BLOCK_LAYOUT: dict[GGMLType, tuple[int, int]] = {
    _T.F32: (1, 4), _T.F16: (1, 2), _T.BF16: (1, 2), _T.F64: (1, 8),
    _T.I8: (1, 1), _T.I16: (1, 2), _T.I32: (1, 4), _T.I64: (1, 8),
    _T.Q4_0: (32, 18), _T.Q4_1: (32, 20), _T.Q5_0: (32, 22), _T.Q5_1: (32, 24),
    _T.Q8_0: (32, 34), _T.Q8_1: (32, 40), _T.IQ4_NL: (32, 18), _T.MXFP4: (32, 17),
    _T.NVFP4: (64, 36), _T.Q1_0: (128, 18),
    _T.Q2_K: (256, 84), _T.Q3_K: (256, 110), _T.Q4_K: (256, 144), _T.Q5_K: (256, 176),
    _T.Q6_K: (256, 210), _T.Q8_K: (256, 292), _T.TQ1_0: (256, 54), _T.TQ2_0: (256, 66),
    _T.IQ2_XXS: (256, 66), _T.IQ2_XS: (256, 74), _T.IQ2_S: (256, 82), _T.IQ3_XXS: (256, 98),
    _T.IQ3_S: (256, 110), _T.IQ1_S: (256, 50), _T.IQ1_M: (256, 56), _T.IQ4_XS: (256, 136),
}
# fmt: on


def _view(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret uint8 bytes as `dtype` without copying when the bytes are aligned."""
    # subtle: view(dtype) needs contiguous bytes at an offset that is a multiple of the item
    # size; a file with general.alignment 1 or 2 can break that, and then one copy is the price.
    raw = raw.contiguous()
    if raw.storage_offset() % dtype.itemsize:
        raw = raw.clone()
    return raw.view(dtype)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 stored at byte `start` of every block, as float32: [n_blocks, 1]."""
    return _view(blocks[:, start : start + 2], torch.float16).float()


def _unpack(qs: torch.Tensor, chunk: int, bits: int) -> torch.Tensor:
    """Split packed bytes into `bits`-wide fields, lowest bits first within each `chunk` of bytes.

    ggml packs a run of `chunk` bytes as: byte j holds weight j in its low bits, weight j + chunk
    in the next bits, and so on. [n, k * chunk] uint8 -> [n, k * chunk * 8 / bits] uint8.
    """
    n = qs.shape[0]
    packed = qs.reshape(n, -1, chunk)  # (n, k, chunk)
    fields = torch.empty(n, packed.shape[1], 8 // bits, chunk, dtype=torch.uint8)
    for j in range(8 // bits):  # 2, 4 or 8 passes over the bit fields, not a loop over blocks
        torch.bitwise_right_shift(packed, j * bits, out=fields[:, :, j])
    fields &= (1 << bits) - 1
    return fields.reshape(n, -1)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # block: d fp16 | 16 bytes of 4-bit q; w = d * (q - 8)
    d = _f16(blocks, 0)
    q = _unpack(blocks[:, 2:], 16, 4).view(torch.int8) - 8  # (n, 32)
    return q.float().mul_(d)


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # block: d fp16 | m fp16 | 16 bytes of 4-bit q; w = d * q + m
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    w = _unpack(blocks[:, 4:], 16, 4).float()  # (n, 32) holding q
    return w.mul_(d).add_(m)  # in place: same rounding as d * q + m, a third of the memory


def _q5_low_high(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Q5_0 / Q5_1's 5-bit values 0..31 from the 4-byte `qh` word at `start` and the 16 bytes of
    low nibbles after it: [n, 32] uint8."""
    low = _unpack(blocks[:, start + 4 :], 16, 4)  # weights 0-15 low nibbles, then 16-31 high
    # subtle: `qh` is one little-endian uint32 whose bit i is weight i's 5th bit, so the bits go
    # in plain order (byte 0 bits 0-7 = weights 0-7, ...), unlike the nibbles, which split the
    # block in halves; read as bytes, a 1-byte chunk gives exactly that order on any host.
    high = _unpack(blocks[:, start : start + 4], 1, 1)  # (n, 32)
    return low | (high << 4)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    # block: d fp16 | qh 4 bytes (5th bits) | 16 bytes of low 4 bits; w = d * (q - 16)
    d = _f16(blocks, 0)
    q = _q5_low_high(blocks, 2).view(torch.int8) - 16  # (n, 32)
    return q.float().mul_(d)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    # block: d fp16 | m fp16 | qh 4 bytes (5th bits) | 16 bytes of low 4 bits; w = d * q + m
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    w = _q5_low_high(blocks, 4).float()  # (n, 32) holding q
    return w.mul_(d).add_(m)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # block: d fp16 | 32 int8 q; w = q * d
    d = _f16(blocks, 0)
    w = blocks[:, 2:].contiguous().view(torch.int8).float()  # (n, 32) holding q
    return w.mul_(d)


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's per-sub-block d * scale and dmin * min: two [n, 8, 1] float32."""
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    packed = blocks[:, 4:16].reshape(n, 3, 4)
    lo_sc, lo_mn, hi = packed[:, 0], packed[:, 1], packed[:, 2]  # (n, 4) each
    # subtle: sub-blocks 0-3 keep their 6-bit scales in bytes 0-3 and mins in bytes 4-7;
    # sub-blocks 4-7 take their low 4 bits from bytes 8-11 (scale low nibble, min high nibble)
    # and their top 2 bits from the spare top 2 bits of bytes 0-7.
    scale = torch.cat([lo_sc & 0x3F, (hi & 0x0F) | ((lo_sc >> 2) & 0x30)], dim=1)  # (n, 8)
    mn = torch.cat([lo_mn & 0x3F, (hi >> 4) | ((lo_mn >> 2) & 0x30)], dim=1)  # (n, 8)
    return (d * scale.float()).reshape(n, 8, 1), (dmin * mn.float()).reshape(n, 8, 1)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # block: d fp16 | dmin fp16 | 12 bytes of 6-bit scales and mins (8 sub-blocks) | 128 bytes q
    # w = (d * scale) * q - (dmin * min), per sub-block of 32 weights
    n = blocks.shape[0]
    sub_d, sub_m = _k_scales(blocks)
    w = _unpack(blocks[:, 16:], 32, 4).reshape(n, 8, 32).float()  # holding q
    return w.mul_(sub_d).sub_(sub_m).reshape(n, 256)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # block: d fp16 | dmin fp16 | 12 bytes of scales and mins, as Q4_K | 32 bytes qh (5th bits)
    # | 128 bytes of low 4 bits; w = (d * scale) * q - (dmin * min), per sub-block of 32 weights
    n = blocks.shape[0]
    sub_d, sub_m = _k_scales(blocks)
    low = _unpack(blocks[:, 48:], 32, 4)  # (n, 256), in sub-block order, as Q4_K
    # subtle: the 32 qh bytes serve all 8 sub-blocks: bit s of qh[l] is the 5th bit of weight l
    # of sub-block s, so 1-bit fields over one 32-byte chunk come out in sub-block order too.
    high = _unpack(blocks[:, 16:48], 32, 1)  # (n, 256)
    w = (low | (high << 4)).reshape(n, 8, 32).float()  # holding q
    return w.mul_(sub_d).sub_(sub_m).reshape(n, 256)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # block: 128 bytes low 4 bits | 64 bytes high 2 bits | 16 int8 scales | d fp16
    # w = (d * scale) * (q - 32), per sub-block of 16 weights
    n = blocks.shape[0]
    scale = blocks[:, 192:208].contiguous().view(torch.int8).float()  # (n, 16)
    sub_d = (_f16(blocks, 208) * scale).reshape(n, 16, 1)
    low = _unpack(blocks[:, :128], 64, 4)  # (n, 256)
    high = _unpack(blocks[:, 128:192], 32, 2)  # (n, 256)
    q = (low | (high << 4)).view(torch.int8) - 32
    return q.reshape(n, 16, 16).float().mul_(sub_d).reshape(n, 256)


_DECODERS: dict[GGMLType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLType.F32: lambda raw: _view(raw, torch.float32),
    GGMLType.F16: lambda raw: _view(raw, torch.float16).float(),
    GGMLType.BF16: lambda raw: _view(raw, torch.bfloat16).float(),
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k,
}
SUPPORTED_TYPES = tuple(_DECODERS)


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode a tensor's bytes to float32 of `shape` (torch order, last dim = ggml's ne[0]).

    F32 comes back as a view of `raw` (no copy) when its bytes are 4-byte aligned.
    """
    ggml_type = GGMLType(ggml_type)
    if ggml_type not in _DECODERS:
        names = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise GGUFError(f"ggml type {ggml_type.name} cannot be dequantized (supported: {names})")
    block_size, type_size = BLOCK_LAYOUT[ggml_type]
    n_blocks = raw.numel() // type_size
    assert raw.dtype == torch.uint8 and raw.numel() == n_blocks * type_size
    assert n_blocks * block_size == torch.Size(shape).numel()
    if block_size == 1:  # plain floats: reinterpret the bytes directly
        return _DECODERS[ggml_type](raw).reshape(shape)
    return _DECODERS[ggml_type](raw.view(n_blocks, type_size)).reshape(shape)


def q8_0_split(raw: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 bytes as (int8 values of `shape`, fp16 scales of shape[:-1] + (shape[-1] // 32,)).

    For int8 matmuls that never inflate the weights: w = qs * scales (one scale per 32 weights
    along the last dim). Example: (576, 576) -> qs (576, 576) int8, scales (576, 18) fp16.
    """
    assert shape[-1] % 32 == 0 and raw.numel() == torch.Size(shape).numel() // 32 * 34
    blocks = raw.view(-1, 34)
    scales = _view(blocks[:, :2], torch.float16).reshape(*shape[:-1], shape[-1] // 32)
    qs = blocks[:, 2:].contiguous().view(torch.int8).reshape(shape)
    return qs, scales


def q4_split(
    raw: torch.Tensor, ggml_type: GGMLType, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 bytes as (4-bit values 0..15 of `shape` uint8, fp16 scales, fp16 mins), with
    w = scale * q + min per 32 weights along the last dim (Q4_0: min = -8 * scale).

    For 4-bit matmuls that never inflate the weights. Example: (576, 576) Q4_1 -> q (576, 576),
    scales and mins (576, 18).
    """
    assert ggml_type in (GGMLType.Q4_0, GGMLType.Q4_1) and shape[-1] % 32 == 0
    blocks = raw.view(-1, BLOCK_LAYOUT[ggml_type][1])
    groups = (*shape[:-1], shape[-1] // 32)
    d = _view(blocks[:, :2], torch.float16).reshape(groups)
    if ggml_type == GGMLType.Q4_0:
        m, start = -8 * d, 2
    else:
        m, start = _view(blocks[:, 2:4], torch.float16).reshape(groups), 4
    return _unpack(blocks[:, start:], 16, 4).reshape(shape), d, m


def kquant_split(
    raw: torch.Tensor, ggml_type: GGMLType, shape: tuple[int, ...]
) -> tuple[torch.Tensor, ...]:
    """Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K bytes as (unsigned values of `shape` uint8, scales[,
    mins]) with w = scale * (q - offset) + min along the last dim, as ggml dequantizes them:

    Q5_0: q 0..31, fp16 d per 32, offset 16. Q5_1: q 0..31, fp16 d and m per 32.
    Q4_K / Q5_K: q 0..15 / 0..31, float32 d * scale and -(dmin * min) per 32 (exact products).
    Q6_K: q 0..63, float32 d * scale per 16, offset 32.
    Example: (640, 2048) Q6_K -> q (640, 2048), scales (640, 128).
    """
    n_blocks = torch.Size(shape).numel() // BLOCK_LAYOUT[ggml_type][0]
    blocks = raw.view(n_blocks, BLOCK_LAYOUT[ggml_type][1])
    rows = shape[:-1]
    if ggml_type in (GGMLType.Q5_0, GGMLType.Q5_1):
        d = _view(blocks[:, :2], torch.float16).reshape(*rows, -1)
        if ggml_type == GGMLType.Q5_0:
            return _q5_low_high(blocks, 2).reshape(shape), d
        m = _view(blocks[:, 2:4], torch.float16).reshape(*rows, -1)
        return _q5_low_high(blocks, 4).reshape(shape), d, m
    if ggml_type == GGMLType.Q6_K:
        scale = blocks[:, 192:208].contiguous().view(torch.int8).float()  # (n, 16)
        q = _unpack(blocks[:, :128], 64, 4) | (_unpack(blocks[:, 128:192], 32, 2) << 4)
        return q.reshape(shape), (_f16(blocks, 208) * scale).reshape(*rows, -1)
    assert ggml_type in (GGMLType.Q4_K, GGMLType.Q5_K), ggml_type
    sub_d, sub_m = _k_scales(blocks)
    if ggml_type == GGMLType.Q4_K:
        q = _unpack(blocks[:, 16:], 32, 4)
    else:  # Q5_K: the 5th bits as in _q5_k
        q = _unpack(blocks[:, 48:], 32, 4) | (_unpack(blocks[:, 16:48], 32, 1) << 4)
    return q.reshape(shape), sub_d.reshape(*rows, -1), -sub_m.reshape(*rows, -1)
