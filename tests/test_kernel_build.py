"""The kernel build cache: keyed by what makes builds differ, shared by environments that
agree, one status line while compiling and none after."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinyformers.kernels import build

REPO = Path(__file__).resolve().parents[1]
LOAD = "from tinyformers import kernels; print(kernels.available(), kernels.unavailable_reason())"


KERNELS = build.kernels_build()


def test_key_changes_with_torch_flags_compiler_and_source(monkeypatch, tmp_path):
    one = build.TOKENIZER  # plain C++: a build on every CPU
    base = build.build_key(one)
    assert len(base) == 16 and build.build_key(one) == base  # stable within an environment
    changed = []
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "0.0.1")
        changed.append(build.build_key(one))
    changed.append(build.build_key(dataclasses.replace(one, cflags=(*one.cflags, "-DNDEBUG"))))
    with monkeypatch.context() as m:
        m.setenv("CXX", "clang++")
        changed.append(build.build_key(one))
    source = tmp_path / "bpe.cpp"
    source.write_bytes(one.sources[0].read_bytes() + b"\n// one more line\n")
    changed.append(build.build_key(dataclasses.replace(one, sources=(source,))))
    assert base not in changed and len(set(changed)) == 4


def test_build_dir_lives_under_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert build.build_dir(build.TOKENIZER) == tmp_path / "tinyformers" / build.build_key(
        build.TOKENIZER
    )


def test_each_cpu_kind_gets_its_widest_build(monkeypatch):
    """AVX-512 where the CPU has all of it, else AVX2, else a reason; never flags it lacks."""
    avx2 = ["avx2", "fma", "f16c"]
    zen4 = [*avx2, "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"]
    for flags, isa in ((zen4, "avx512"), (avx2, "avx2"), ([*avx2, "avx512f"], "avx2")):
        monkeypatch.setattr(build, "_cpu_flags", lambda flags=flags: flags)
        got = build.kernels_build()
        assert got.what == f"CPU kernels ({isa})"
        assert ("-mavx512f" in got.cflags, "-mavx2" in got.cflags) == (
            isa == "avx512",
            isa == "avx2",
        )
    monkeypatch.setattr(build, "_cpu_flags", lambda: ["sse4_2", "avx"])
    assert build.kernels_build().startswith("this CPU has neither AVX-512")


@pytest.mark.skipif(isinstance(KERNELS, str), reason="this CPU cannot run the kernels")
def test_compiles_once_with_a_status_line_and_another_checkout_reuses_it(tmp_path):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache")}
    env.pop("TINYFORMERS_NO_KERNELS", None)

    def load(checkout: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", LOAD],
            env={**env, "PYTHONPATH": str(checkout)},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )

    first = load(REPO)
    assert first.stdout == "True None\n", first.stderr
    assert first.stderr.startswith(f"tinyformers: compiling {KERNELS.what}, once (~10 s), into ")
    assert first.stderr.count("\n") == 1, first.stderr
    (library,) = (tmp_path / "cache" / "tinyformers").glob("*/tinyformers_gemv.so")
    built = library.stat().st_mtime_ns

    # Another checkout of the same source elsewhere: same key, no rebuild, no status line.
    other = tmp_path / "other-checkout"
    shutil.copytree(
        REPO / "tinyformers", other / "tinyformers", ignore=shutil.ignore_patterns("__pycache__")
    )
    again = load(other)
    assert again.stdout == "True None\n" and again.stderr == "", again.stderr
    assert library.stat().st_mtime_ns == built
