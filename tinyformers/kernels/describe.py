"""What a model's weights are, packed for the kernels or not: for `info()`, `dtype` and
`num_parameters` of a loaded model, which need not know the packed formats."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .modules import PackedEmbedding, PackedLinear, prefill_kernels
from .packed import KQUANT, PackedWeight

FORMAT_NAMES = {
    "f32": "float32 packed for the CPU kernels",
    "bf16": "bfloat16 packed for the CPU kernels",
    "int8": "int8 (a scale per 32) packed for the CPU kernels",
    "q4": "4-bit GGUF blocks packed for the CPU kernels",
} | {f: f"GGUF {f.upper()} blocks packed for the CPU kernels" for f in KQUANT}


@dataclass
class Description:
    dtype: torch.dtype  # of the matrices' math: quantized ones compute in float32
    parameters: int  # tied ones once, packed ones as the matrices they stand for
    formats: dict[str, str]  # "matrices", "embeddings", "norms" -> how they are stored
    prefill: str | None  # which matmul runs the passes of many rows (None: not packed)


def describe(net: nn.Module) -> Description:
    """`net`'s weights: dtype, parameter count (what HF's `num_parameters()` says of the
    checkpoint), storage of each group of tensors and the prefill matmuls."""
    return Description(_dtype(net), _parameters(net), _formats(net), prefill_kernels(net))


def _dtype(net: nn.Module) -> torch.dtype:
    for module in net.modules():
        if isinstance(module, nn.Linear):
            return module.weight.dtype
        if isinstance(weight := getattr(module, "weight", None), PackedWeight):
            return torch.bfloat16 if weight.fmt == "bf16" else torch.float32
    return next(net.parameters()).dtype


def _parameters(net: nn.Module) -> int:
    params = {p.data_ptr(): p.numel() for p in net.parameters()}
    packed = {id(m): m.n * m.k for m in net.modules() if isinstance(m, PackedWeight)}
    return sum(params.values()) + sum(packed.values())


def _formats(net: nn.Module) -> dict[str, str]:
    """How each group of tensors is stored: dtype, or the kernels' packed format."""
    groups: dict[str, set[str]] = {"matrices": set(), "embeddings": set(), "norms": set()}
    for name, module in net.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, PackedWeight):
            fmt = FORMAT_NAMES[weight.fmt]
        elif isinstance(weight, Tensor):
            fmt = str(weight.dtype).removeprefix("torch.")
        else:
            continue
        if isinstance(module, (nn.Embedding, PackedEmbedding)):
            groups["embeddings"].add(fmt)
        elif isinstance(module, (nn.Linear, PackedLinear)):
            groups["matrices" if name != "lm_head" else "embeddings"].add(fmt)
        elif not isinstance(module, PackedWeight):
            groups["norms"].add(fmt)
    return {group: " and ".join(sorted(fmts)) for group, fmts in groups.items() if fmts}
