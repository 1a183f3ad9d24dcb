"""Put a loaded model on the kernels: every nn.Linear becomes a PackedLinear.

A tied input embedding (GPT-2's wte, SmolLM2's embed_tokens) reads its rows from the packed
lm_head, so the model keeps one copy of that matrix, as before packing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .packed import BLOCK, PackedWeight, linear, pack


class PackedLinear(nn.Module):
    """nn.Linear with its weight in a kernel layout (f32, bf16 or int8)."""

    def __init__(self, weight: PackedWeight, bias: Tensor | None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class PackedEmbedding(nn.Module):
    """Embedding lookup from a PackedWeight [V, C]: row i of the matrix is token i's vector."""

    def __init__(self, weight: PackedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = weight
        self.dtype = dtype

    def forward(self, ids: Tensor) -> Tensor:
        w, rows = self.weight, BLOCK[self.weight.fmt]
        block, row = ids // rows, ids % rows  # where each token's row sits in the blocks
        if w.fmt == "f32":  # data (N/32, K, 32)
            out = w.data[block, :, row]  # (..., K)
        elif w.fmt == "bf16":  # data (N/32, K/2, 32, 2)
            out = w.data[block, :, row, :].flatten(-2).float()  # (..., Kp)
        else:  # data (N/16, Kp/4, 16, 4) as w + 128, scales (N/16, Kp/G, 16)
            q = w.data[block, :, row, :].flatten(-2).float() - 128  # (..., Kp)
            scales = w.scales[block, :, row].float()  # (..., Kp/G)
            out = q * scales.repeat_interleave(w.group_size, dim=-1)
        return out[..., : w.k].to(self.dtype)


def pack_model(net: nn.Module, fmt: str) -> nn.Module:
    """Replace every nn.Linear of `net` by a PackedLinear in `fmt` ("f32", "bf16", "int8"),
    and a tied embedding by a PackedEmbedding over the same packed matrix."""
    embedding_of = {
        m.weight.data_ptr(): (parent, name)
        for parent in net.modules()
        for name, m in parent.named_children()
        if isinstance(m, nn.Embedding)
    }
    # (parent, name) pairs, not the modules: holding the old Linears would keep every dense
    # weight alive until the end, two copies of the model at the peak.
    linears = [
        (parent, name)
        for parent in net.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    for parent, name in linears:
        child = getattr(parent, name)
        packed = pack(child.weight.detach(), fmt)
        tied = embedding_of.get(child.weight.data_ptr())
        if tied is not None:  # the same matrix: lm_head = wte
            owner, attr = tied
            setattr(owner, attr, PackedEmbedding(packed, child.weight.dtype))
        bias = None if child.bias is None else child.bias.detach()
        setattr(parent, name, PackedLinear(packed, bias))
        del child
    return net
