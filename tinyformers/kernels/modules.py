"""Put a loaded model on the kernels: every nn.Linear becomes a PackedLinear.

A tied input embedding (GPT-2's wte, SmolLM2's embed_tokens) reads its rows from the packed
lm_head, so the model keeps one copy of that matrix, as before packing.
"""

from __future__ import annotations

import ctypes
import functools

from torch import Tensor, nn

from .packed import PackedWeight, linear, pack


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

    def __init__(self, weight: PackedWeight) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.weight.rows(ids)  # (..., C) float32


def pack_model(
    net: nn.Module, fmt: str, prepacked: dict[str, PackedWeight] | None = None
) -> nn.Module:
    """Replace every nn.Linear of `net` by a PackedLinear in `fmt` ("f32", "bf16", "int8"),
    and a tied embedding by a PackedEmbedding over the same packed matrix. `prepacked` gives
    weights already packed (a GGUF file's own blocks) by module name: they are used as they are.

    Everything else (norms, biases, position embeddings, so activations and the KV cache)
    becomes float32: the kernels compute in float32 anyway, these tensors are a few percent of
    the bytes, and torch's CPU attention is several times slower in bfloat16.
    """
    embedding_of = {  # the matrix of each embedding -> where the embedding sits
        m.weight.data_ptr(): (parent, name, f"{parent_name}.{name}".lstrip("."))
        for parent_name, parent in net.named_modules()
        for name, m in parent.named_children()
        if isinstance(m, nn.Embedding)
    }
    # (parent, name) pairs, not the modules: holding the old Linears would keep every dense
    # weight alive until the end, two copies of the model at the peak.
    linears = [
        (parent, name, f"{parent_name}.{name}".lstrip("."))
        for parent_name, parent in net.named_modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    prepacked = prepacked or {}
    # Largest first: while the big lm_head is packed, nothing else has been freed yet, and the
    # smaller ones then reuse the memory freed behind them (peak: one copy of the lm_head).
    linears.sort(key=lambda item: -getattr(item[0], item[1]).weight.numel())
    for parent, name, full_name in linears:
        child = getattr(parent, name)
        owner, attr, tied_name = embedding_of.get(child.weight.data_ptr(), (None, None, None))
        packed = (
            prepacked.get(full_name) or prepacked.get(tied_name) or pack(child.weight.detach(), fmt)
        )
        if owner is not None:  # the same matrix: lm_head = wte
            setattr(owner, attr, PackedEmbedding(packed))
        bias = None if child.bias is None else child.bias.detach()
        setattr(parent, name, PackedLinear(packed, bias))
        del child
        _return_freed_memory()
    for p in net.parameters():
        p.data = p.data.float()
    return net


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def _return_freed_memory() -> None:
    """subtle: glibc keeps freed heap memory for reuse, and the packed copies are allocated
    before the dense weights they replace are freed, so without handing the freed memory back
    RSS would grow towards both layouts of every matrix."""
    if trim := _malloc_trim():
        trim(0)
