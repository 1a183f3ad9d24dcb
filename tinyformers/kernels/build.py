"""Compile gemv.cpp at first use and load its ops, or say in one line why that cannot happen.

The build lives in a folder keyed by everything that makes one build differ from another
(torch and Python versions, CPU architecture, compiler and flags, the source's hash), under
TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions)/tinyformers/. Two venvs or checkouts
with the same key share one build; with different keys each keeps its own, so neither
rebuilds the other's. Set TINYFORMERS_NO_KERNELS=1 to force the torch path.
"""

import functools
import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

SOURCES = [
    Path(__file__).with_name(f)
    for f in ("gemv.h", "gemv.cpp", "kquant.cpp", "layers.cpp", "bpe.cpp")
]
NAME = "tinyformers_gemv"
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


def build_key() -> str:
    """16 hex digits that change whenever a build made here would differ."""
    parts = [
        torch.__version__,
        str(torch.version.git_version),
        sys.implementation.cache_tag,  # the Python ABI, e.g. cpython-311
        platform.machine(),
        os.environ.get("CXX", "c++"),
        " ".join(CFLAGS),
        *(hashlib.sha256(source.read_bytes()).hexdigest() for source in SOURCES),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build_dir() -> Path:
    """The folder of this environment's build (see the module docstring)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or "~/.cache/torch_extensions"
    return Path(root).expanduser() / "tinyformers" / build_key()


@functools.cache
def load_ops() -> tuple[object | None, str | None]:
    """(torch.ops.tinyformers, None) once compiled and loaded, else (None, one-line reason)."""
    if os.environ.get("TINYFORMERS_NO_KERNELS") == "1":
        return None, "disabled by TINYFORMERS_NO_KERNELS=1"
    problem = _cpu_problem()
    if problem:
        return None, problem
    folder = build_dir()
    library = folder / f"{NAME}.so"
    try:
        if library.is_file() and not (folder / "lock").exists():
            # subtle: never hand a finished build back to cpp_extension.load: its ninja file
            # names this venv's torch headers and this checkout's path, so another environment
            # with the same key would see a changed command and rebuild.
            torch.ops.load_library(str(library))
        else:
            _compile(folder)
    except Exception as e:  # no compiler, no ninja, a compile error: all mean "use torch"
        lines = str(e).splitlines() or [type(e).__name__]
        said = [ln for ln in lines if any(w in ln for w in ("error:", "not found", "required"))]
        return None, f"{SOURCES[0].parent}: build failed: {(said or lines)[0].strip()[:200]}"
    _register_fakes()
    return torch.ops.tinyformers, None


def _compile(folder: Path) -> None:
    from torch.utils import cpp_extension

    print(f"tinyformers: compiling CPU kernels, once (~10 s), into {folder}", file=sys.stderr)
    folder.mkdir(parents=True, exist_ok=True)
    # The sources are compiled from copies inside the keyed folder, so the build does not
    # depend on where this checkout lives.
    for source in SOURCES:
        shutil.copyfile(source, folder / source.name)
    cpp_extension.load(
        NAME,
        [str(folder / source.name) for source in SOURCES if source.suffix == ".cpp"],
        extra_cflags=CFLAGS,
        build_directory=str(folder),
        is_python_module=False,
    )


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
    torch.library.register_fake("tinyformers::gemv_kquant")(
        lambda x, w, scales, bias, n, kind: out(x, n)
    )
    # The ops between the matmuls (layers.cpp)
    torch.library.register_fake("tinyformers::rms_norm")(lambda x, weight, eps: torch.empty_like(x))
    torch.library.register_fake("tinyformers::silu_mul")(
        lambda gate_up: out(gate_up, gate_up.shape[-1] // 2)
    )
    torch.library.register_fake("tinyformers::rope_cache")(
        lambda qkv, cos, sin, k_cache, v_cache, pos, n_head: qkv.new_empty(
            (qkv.shape[0], n_head, qkv.shape[1], k_cache.shape[3])
        )
    )
    torch.library.register_fake("tinyformers::decoder_layers")(
        lambda x, weights, meta, k_caches, v_caches, cos, sin, pos, masks, kind, eps, scales: (
            torch.empty_like(x, memory_format=torch.contiguous_format)
        )
    )
    torch.library.register_fake("tinyformers::attend")(
        lambda q, k_cache, v_cache, mask, scale: q.new_empty(
            (q.shape[0], q.shape[2], q.shape[1] * q.shape[3])
        )
    )
