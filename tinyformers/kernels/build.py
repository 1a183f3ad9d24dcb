"""Compile gemv.cpp at first use and load its ops, or say in one line why that cannot happen.

The build is cached by torch (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) and
rebuilt only when the source changes. Set TINYFORMERS_NO_KERNELS=1 to force the torch path.
"""

import functools
import os
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("gemv.cpp")
# What the kernels execute: AVX-512 F/BW/VL, vdpbf16ps, vpdpbusd, vcvtph2ps.
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "f16c", "fma")
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni"]
CFLAGS += ["-mf16c", "-mfma", "-fopenmp"]  # -fopenmp: at::parallel_for runs on torch's own pool


def _cpu_problem() -> str | None:
    """Why this CPU cannot run the kernels, or None."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no /proc/cpuinfo to check the CPU for AVX-512 (the kernels are Linux x86 only)"
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    missing = [f for f in CPU_FLAGS if f not in flags]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


@functools.cache
def load_ops() -> tuple[object | None, str | None]:
    """(torch.ops.tinyformers, None) once compiled and loaded, else (None, one-line reason)."""
    if os.environ.get("TINYFORMERS_NO_KERNELS") == "1":
        return None, "disabled by TINYFORMERS_NO_KERNELS=1"
    problem = _cpu_problem()
    if problem:
        return None, problem
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            "tinyformers_gemv", [str(SOURCE)], extra_cflags=CFLAGS, is_python_module=False
        )
    except Exception as e:  # no compiler, no ninja, a compile error: all mean "use torch"
        lines = str(e).splitlines() or [type(e).__name__]
        said = [ln for ln in lines if any(w in ln for w in ("error:", "not found", "required"))]
        return None, f"{SOURCE}: build failed: {(said or lines)[0].strip()[:200]}"
    _register_fakes()
    return torch.ops.tinyformers, None


def _register_fakes() -> None:
    """Shape-only versions of the ops, so torch.compile can trace a model that calls them."""

    def out(x: torch.Tensor, n: int) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], n))

    for name in ("gemv_f32", "gemv_bf16"):
        torch.library.register_fake(f"tinyformers::{name}")(lambda x, w, bias, n: out(x, n))
    torch.library.register_fake("tinyformers::gemv_int8")(
        lambda x, w, scales, bias, n, group_size: out(x, n)
    )
    torch.library.register_fake("tinyformers::gemv_q4")(lambda x, w, scales, bias, n: out(x, n))
