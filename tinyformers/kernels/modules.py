"""Put a loaded model on the kernels: every nn.Linear becomes a PackedLinear.

A tied input embedding (GPT-2's wte, SmolLM2's embed_tokens) reads its rows from the packed
lm_head, so the model keeps one copy of that matrix, as before packing.
"""

from __future__ import annotations

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
    embedding_of = {
        m.weight.data_ptr(): (parent, name)
        for parent in net.modules()
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
    for parent, name, full_name in linears:
        child = getattr(parent, name)
        packed = prepacked.get(full_name) or pack(child.weight.detach(), fmt)
        tied = embedding_of.get(child.weight.data_ptr())
        if tied is not None:  # the same matrix: lm_head = wte
            owner, attr = tied
            setattr(owner, attr, PackedEmbedding(packed))
        bias = None if child.bias is None else child.bias.detach()
        setattr(parent, name, PackedLinear(packed, bias))
        del child
    for p in net.parameters():
        p.data = p.data.float()
    return net
