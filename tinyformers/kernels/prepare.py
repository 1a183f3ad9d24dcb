"""The one step that makes a loaded model fast, run by `tinyformers.load` after the weights.

Loading builds the model as its file reads (nn.Linear, written-out math); `prepare` then turns
on torch's fused paths (SDPA, fused layer norm) and, on a CPU that runs our kernels, packs
every matrix (modules.pack_model: q/k/v and gate/up stacked, the fused modules swapped in) and
gives a Llama a float16 KV cache beside 16-bit or quantized matrices.
"""

from __future__ import annotations

import torch
from torch import nn

from tinyformers.errors import TinyformersError
from tinyformers.models import set_fast_path

from . import available, unavailable_reason
from .modules import pack_model
from .packed import PackedWeight

FORMAT_OF_DTYPE = {torch.float32: "f32", torch.bfloat16: "bf16"}  # float16: torch's kernels


def check_quantize(quantize: str, device: torch.device) -> None:
    """Raise unless `quantize` ("int8", "gguf") can run here: it runs only on our CPU kernels.
    Called before the weights are read, so a machine without them fails in a second."""
    if device.type != "cpu":
        raise ValueError(f"quantize {quantize} runs on the CPU kernels: use device cpu")
    if not available():
        raise TinyformersError(f"quantize {quantize} needs the CPU kernels: {unavailable_reason()}")


def prepare(
    net: nn.Module,
    quantize: str | None = None,
    blocks: dict[str, tuple] | None = None,
) -> nn.Module:
    """`net` on its fast paths, in place. quantize "int8": every matrix int8 with a scale per
    32; "gguf": `blocks` (a GGUF file's own quantized blocks by module name) as stored, the
    rest float32. Otherwise float32 and bfloat16 matrices are packed where the kernels run."""
    param = next(net.parameters())
    if quantize:
        check_quantize(quantize, param.device)
        fmt = "int8" if quantize == "int8" else "f32"
    elif param.device.type == "cpu" and available():
        fmt = FORMAT_OF_DTYPE.get(param.dtype)
    else:
        fmt = None  # CUDA: torch's own kernels are the fast path
    if fmt is not None:
        pack_model(net, fmt, quantized=blocks)
        _half_cache_beside_16_bit_weights(net)
    set_fast_path(net, True)
    return net


def _half_cache_beside_16_bit_weights(net: nn.Module) -> None:
    """A float16 KV cache where the kernels run bfloat16 or quantized matrices (every
    architecture's `cache_dtype`; the fused attention reads float16): llama.cpp's default, and
    half the bytes a decode step's attention reads. Float32 matrices keep a float32 cache
    (parity)."""
    formats = {m.fmt for m in net.modules() if isinstance(m, PackedWeight)}
    if formats - {"f32"}:
        net.cache_dtype = torch.float16
