"""Compile the C++ at first use and load its ops, or say in one line why that cannot happen.

Two libraries, built apart so that each runs wherever it can:
- the kernels (gemv.cpp, kquant.cpp, layers.cpp), for the widest vector instructions this CPU
  has: AVX-512 (Zen 4, Xeon since Cooper Lake) or AVX2 (Zen 2-3, Intel since Haswell);
- the tokenizer's loop (bpe.cpp), plain C++ that any compiler builds for any CPU.

Each build lives in a folder keyed by everything that makes one build differ from another
(torch and Python versions, CPU architecture, compiler and flags, the sources' hash), under
TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions)/tinyformers/. Two venvs or checkouts
with the same key share one build; with different keys each keeps its own, so neither
rebuilds the other's. Set TINYFORMERS_NO_KERNELS=1 to force the torch (and Python) paths.
"""

import functools
import hashlib
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).parent
# What each instruction set's build needs of the CPU, and the flags that let the compiler use it;
# the first one the CPU has is built. AVX-512: vdpbf16ps, vpdpbusd, 16-lane masks. AVX2: 8-lane
# ymm, with bf16 widened to float32 and int8 dot products through vpmaddubsw.
ISAS = {
    "avx512": (
        ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "f16c", "fma"),
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni"),
    ),
    "avx2": (("avx2", "fma", "f16c"), ("-mavx2",)),
}


@dataclass(frozen=True)
class Build:
    """One library: its sources and compiler flags, and what its status line calls it."""

    name: str
    sources: tuple[Path, ...]
    cflags: tuple[str, ...]
    what: str


TOKENIZER = Build("tinyformers_bpe", (HERE / "bpe.cpp",), ("-O3",), "the tokenizer's C++ loop")


@functools.cache  # load_ops asks at every call (choose.py: once per weight at load)
def _cpu_flags() -> tuple[str, ...] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next(
        (tuple(ln.split(":", 1)[1].split()) for ln in text.splitlines() if ln.startswith("flags")),
        (),
    )


def kernels_build() -> Build | str:
    """The kernels' build for this CPU, or one line saying why it has none."""
    flags = _cpu_flags()
    if flags is None:
        return (
            "no /proc/cpuinfo to check the CPU for AVX2 or AVX-512 (the kernels are Linux x86 only)"
        )
    for isa, (needs, isa_flags) in ISAS.items():
        if all(f in flags for f in needs):
            sources = tuple(HERE / f for f in ("gemv.h", "gemv.cpp", "kquant.cpp", "layers.cpp"))
            # -fopenmp: at::parallel_for runs on torch's own pool
            cflags = ("-O3", *isa_flags, "-mf16c", "-mfma", "-fopenmp")
            return Build("tinyformers_gemv", sources, cflags, f"CPU kernels ({isa})")
    return "this CPU has neither AVX-512 (with bf16 and VNNI) nor AVX2 with FMA and F16C"


def build_key(build: Build) -> str:
    """16 hex digits that change whenever a build made here would differ."""
    parts = [
        torch.__version__,
        str(torch.version.git_version),
        sys.implementation.cache_tag,  # the Python ABI, e.g. cpython-311
        platform.machine(),
        os.environ.get("CXX", "c++"),
        " ".join(build.cflags),
        *(hashlib.sha256(source.read_bytes()).hexdigest() for source in build.sources),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build_dir(build: Build) -> Path:
    """The folder of this environment's build (see the module docstring)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or "~/.cache/torch_extensions"
    return Path(root).expanduser() / "tinyformers" / build_key(build)


def load_ops() -> tuple[object | None, str | None]:
    """(torch.ops.tinyformers, None) once the kernels are compiled and loaded, else (None,
    one-line reason)."""
    build = kernels_build()
    if isinstance(build, str):
        return None, build
    return _load(build)


def load_tokenizer_ops() -> tuple[object | None, str | None]:
    """(torch.classes.tinyformers, None) once bpe.cpp is compiled and loaded, else (None,
    one-line reason)."""
    return _load(TOKENIZER)


@functools.cache
def _load(build: Build) -> tuple[object | None, str | None]:
    if os.environ.get("TINYFORMERS_NO_KERNELS") == "1":
        return None, "disabled by TINYFORMERS_NO_KERNELS=1"
    folder = build_dir(build)
    library = folder / f"{build.name}.so"
    try:
        if library.is_file() and not (folder / "lock").exists():
            # subtle: never hand a finished build back to cpp_extension.load: its ninja file
            # names this venv's torch headers and this checkout's path, so another environment
            # with the same key would see a changed command and rebuild.
            torch.ops.load_library(str(library))
        else:
            _compile(build, folder)
    except Exception as e:  # no compiler, no ninja, a compile error: all mean "use torch"
        lines = str(e).splitlines() or [type(e).__name__]
        said = [ln for ln in lines if any(w in ln for w in ("error:", "not found", "required"))]
        return None, f"{HERE}: build failed: {(said or lines)[0].strip()[:200]}"
    if build is TOKENIZER:
        return torch.classes.tinyformers, None
    _register_fakes()
    return torch.ops.tinyformers, None


def _compile(build: Build, folder: Path) -> None:
    from torch.utils import cpp_extension

    print(f"tinyformers: compiling {build.what}, once (~10 s), into {folder}", file=sys.stderr)
    folder.mkdir(parents=True, exist_ok=True)
    # The sources are compiled from copies inside the keyed folder, so the build does not
    # depend on where this checkout lives.
    for source in build.sources:
        shutil.copyfile(source, folder / source.name)
    cpp_extension.load(
        build.name,
        [str(folder / source.name) for source in build.sources if source.suffix == ".cpp"],
        extra_cflags=list(build.cflags),
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
    torch.library.register_fake("tinyformers::gelu_tanh")(lambda h: torch.empty_like(h))
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
