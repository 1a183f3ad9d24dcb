"""The small ops between a decoder layer's matmuls, one C++ pass each (layers.cpp).

A decode step of SmolLM2 runs ~60 torch ops per layer besides its 4 matmuls, each a Python
call, a dispatch and an allocation for a few hundred numbers; these four ops do the same work
in one call each, and `decoder_layers` runs every decoder layer (norms, the packed matmuls,
rotary, cache write, attention, residual adds) in one call for the few query rows of decode:
Llama's, GPT-2's (layer norms, biases, no rotation, GELU) and Gemma 3's (q/k norms, norms
after each sublayer, GeGLU) alike.
The fused modules (swap.py) call them beside the model files' written-out math, only where
`usable(x)`: float32 activations on the CPU with the kernels loaded, no autograd.

Example:
    if fused.usable(x):
        y = fused.rms_norm(x, norm.weight, norm.eps)  # = x * rsqrt(mean(x^2) + eps) * weight
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .build import load_ops
from .packed import KIND, PackedWeight

_OPS: list = []  # the loaded ops, or None: a plain value torch.compile can trace through
ATTEND_ROWS = 16  # query positions up to which `attend` runs ours; more (prefill): SDPA's


def _ops():
    if not _OPS:
        _OPS.append(load_ops()[0])
    return _OPS[0]


def usable(x: Tensor) -> bool:
    """True when the fused ops can compute on `x`: float32 on the CPU, kernels loaded, no grad."""
    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and not (x.requires_grad and torch.is_grad_enabled())
        and _ops() is not None
    )


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / rms(x) * weight over the last dim, in one pass. x [..., C] -> [..., C]."""
    return _ops().rms_norm(x.contiguous(), weight.contiguous(), eps)


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for gate and up stacked on the last dim: [..., 2H] -> [..., H]."""
    return _ops().silu_mul(gate_up.contiguous())


def gelu_tanh(h: Tensor) -> Tensor:
    """gelu(h) in its tanh approximation (GPT-2's), in one pass: [..., H] -> [..., H]."""
    return _ops().gelu_tanh(h.contiguous())


def rope_cache(qkv: Tensor, cos: Tensor, sin: Tensor, cache, input_pos: Tensor, n_head: int):
    """Rotate q and k of qkv [B, T, (nh + 2 nkv) hs] (cos, sin [B, 1, T, hs]), write k and v
    into `cache` at slots `input_pos` [T]; return q rotated, [B, nh, T, hs]."""
    k, v = cache.k, cache.v
    return _ops().rope_cache(qkv.contiguous(), cos.contiguous(), sin.contiguous(), k, v,
                              input_pos, n_head)  # fmt: skip


def attend(q: Tensor, cache, mask: Tensor, scale: float, input_pos: Tensor) -> Tensor:
    """softmax(q k^T * scale, masked) v over the cache (float32 or float16), each group of
    query heads sharing its kv head: q [B, nh, T, hs], mask [B, 1, T, S], input_pos the slots
    of q's rows ([T] or [B, T]) -> z [B, T, nh * hs]."""
    B, nh, T, hs = q.shape
    if T <= ATTEND_ROWS:
        return _ops().attend(q, cache.k, cache.v, mask, scale)
    # Prefill: SDPA's flash kernel, parallel over query blocks, over the slots written so far
    # (not the whole cache); a float16 cache is read as float32.
    end = int(input_pos.max()) + 1
    k, v = cache.k[:, :, :end].to(q.dtype), cache.v[:, :, :end].to(q.dtype)
    mask = mask[..., :end]
    # subtle: a prompt from slot 0 with no padding (its last row reads every slot) is plain
    # causal attention: then SDPA skips the masked half of the scores, where with the mask it
    # computes all of them (2x the work of a long prompt: HF passes is_causal there too).
    causal = input_pos.dim() == 1 and end == T and bool(mask[:, :, -1].all())
    z = F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if causal else mask, is_causal=causal, scale=scale, enable_gqa=True
    )
    return z.transpose(1, 2).reshape(B, T, nh * hs)  # (B, nh, T, hs) -> (B, T, nh*hs)


# packed_linear's (gemv.cpp): then kquant.cpp's formats, 4 + their kind
FORMAT_CODES = {"f32": 0, "bf16": 1, "int8": 2, "q4": 3} | {f: 4 + i for f, i in KIND.items()}
ACTIVATIONS = {"silu_gated": 0, "gelu_tanh_gated": 1, "gelu_tanh": 2}  # decoder_layer's Act


def layer_weights(norms, linears) -> tuple[list, list[int]] | None:
    """The tensors and [format, n, group size] triples `decoder_layer` takes for a layer, or
    None when a matrix is not packed. norms: the 8 of layers.cpp's `Norm` order (ln1 weight and
    bias, ln2 weight and bias, the norms after attention and after the MLP, the q and k norms;
    None where the model has none); linears: q/k/v, o, up (or gate/up), down."""
    weights, meta = list(norms), []
    for linear in linears:
        w = getattr(linear, "weight", None)
        if not isinstance(w, PackedWeight) or FORMAT_CODES.get(w.fmt) is None:
            return None
        weights += [w._buffers["data"], w._buffers["scales"], linear.bias]
        meta += [FORMAT_CODES[w.fmt], w.n, w.group_size]
    return weights, meta


def decoder_layers(
    x: Tensor,
    packed,
    angles,
    cache,
    input_pos,
    masks,
    scales,
    *,
    activation: str,
    n_head: int,
    eps: float,
    gain_plus_one: bool = False,
) -> Tensor:
    """Decoder layers in one C++ call (up to ATTEND_ROWS query rows): x [B, T, C] -> [B, T, C].
    `packed` holds the layers' `layer_weights`, flattened; layer i rotates by angles[i] (cos,
    sin [B, 1, T, hs], or None: no rotation), writes k and v into cache[i] at `input_pos`, and
    attends under masks[i] with scores scaled by scales[i]. gain_plus_one: the RMS norms
    multiply by 1 + weight (Gemma stores its gains minus 1)."""
    weights, meta = packed
    k, v = [c.k for c in cache], [c.v for c in cache]
    cos = [None if a is None else a[0] for a in angles]
    sin = [None if a is None else a[1] for a in angles]
    kind = [ACTIVATIONS[activation], n_head, int(gain_plus_one)]
    return _ops().decoder_layers(x, weights, meta, k, v, cos, sin, input_pos, masks, kind, eps,
                                 scales)  # fmt: skip
