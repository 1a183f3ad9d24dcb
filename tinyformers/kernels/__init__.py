"""CPU decode kernels: small-M matmuls that stream packed weights near memory bandwidth.

Decode reads every weight once per step, so its speed is weight bytes / bandwidth; torch's
stock gemv reaches about a third of the bandwidth on AVX-512 CPUs, these kernels most of it.
See docs/kernels.md for the formats and measured figures.

Example:
    w = kernels.pack(layer.weight, "int8")
    y = kernels.linear(x, w, layer.bias)
"""

from .build import load_ops
from .packed import FORMATS, PackedWeight, linear, pack, pack_quantized
from .quantize import quantize_int8, quantize_q4

__all__ = [
    "FORMATS",
    "PackedWeight",
    "available",
    "linear",
    "pack",
    "pack_quantized",
    "quantize_int8",
    "quantize_q4",
    "unavailable_reason",
]


def available() -> bool:
    """True once the kernels are compiled and loaded (compiles on the first call)."""
    return load_ops()[0] is not None


def unavailable_reason() -> str | None:
    """One line saying why `linear` falls back to torch, or None when the kernels run."""
    return load_ops()[1]
