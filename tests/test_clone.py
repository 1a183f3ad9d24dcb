"""The tests run from a plain `git clone`, with nothing beside it: a representative subset
runs in a fresh clone of this repository in a temporary folder, where `../shared` does not
exist, importing the clone's own package."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# These read tests/data (GPT-2's vocab and merges, llama.cpp's vectors and vocab-only GGUF,
# tiktoken's cases, the corpus), and the tokenize command runs from the clone.
SUBSET = ["tests/test_tokenizer.py", "tests/test_gguf.py", "tests/test_tokenizer_cli.py"]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    if not (REPO / ".git").exists():
        pytest.fail(f"{REPO} is not a git checkout: nothing to clone")
    folder = tmp_path_factory.mktemp("clone") / "tinyformers"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(folder)], check=True, timeout=120)
    return folder


def clone_env(clone: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return {**env, "PYTHONPATH": str(clone)}  # the clone's package before the installed one


def test_the_clone_imports_its_own_package_and_has_no_shared_beside_it(clone):
    assert not (clone.parent / "shared").exists()
    run = subprocess.run(
        [sys.executable, "-c", "import tinyformers; print(tinyformers.__file__)"],
        cwd=clone, env=clone_env(clone), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.stdout.strip() == str(clone / "tinyformers" / "__init__.py"), run.stderr


def test_no_test_library_doc_or_ci_reads_shared(clone):
    code = [f for f in clone.glob("**/*.py") if f.name != "test_clone.py"]  # not this one
    files = [*code, *clone.glob("**/*.md"), clone / ".ci" / "run"]
    pattern = re.compile(r"\.\./shared|[\"']shared[\"']")
    hits = [f"{f.relative_to(clone)}: {ln.strip()}" for f in files
            for ln in f.read_text().splitlines() if pattern.search(ln)]  # fmt: skip
    assert hits == []


def test_a_subset_of_the_tests_passes_in_the_clone(clone):
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n0", "-p", "no:cacheprovider", "-m", "not slow",
         *SUBSET],
        cwd=clone, env=clone_env(clone), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    summary = run.stdout.strip().splitlines()[-1]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert re.search(r"\d+ passed", summary) and "failed" not in summary and "error" not in summary
