"""CI's fuzz step: every target of benchmarks/fuzz.py for 5 s (TINYFORMERS_FUZZ_SECONDS), in
one child process, must end with no finding: each mutated input parsed or refused with a
TinyformersError, within 1 s and 100 MB over its own size. Seeded, so a run repeats. Ten
targets at 8 s took 86 s on the AMD EPYC Zen 3, in a suite of 24 minutes there (the goal is
under 20); at 5 s each target still runs hundreds of mutants. Longer runs (10 minutes a
target): `python -m benchmarks.fuzz --target NAME --seconds 600`, see docs/robustness.md.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECONDS = float(os.environ.get("TINYFORMERS_FUZZ_SECONDS", "5"))
TARGETS = ["gguf", "safetensors", "pickle", "tokenizer_json", "vocab_merges", "config",
           "chat_template", "template_filters", "pre_tokenizer", "load"]  # fmt: skip


@pytest.mark.slow
def test_every_fuzz_target_runs_clean(tmp_path):
    args = [sys.executable, "-m", "benchmarks.fuzz", "--seconds", str(SECONDS)]
    args += ["--out", str(tmp_path)]
    done = subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=len(TARGETS) * (SECONDS + 60)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = {s["target"]: s for s in map(json.loads, done.stdout.splitlines())}
    assert sorted(summaries) == sorted(TARGETS)
    for summary in summaries.values():
        assert summary["runs"] > 20, summary  # mutants ran, not only the seeds
        assert summary["findings"] == 0, f"{summary}\n{done.stderr[-3000:]}"
        # the mutants reach the parsers' own refusals, so the error path is exercised
        assert sum(summary["errors"].values()) > 0, summary
