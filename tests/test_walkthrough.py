"""docs/walkthrough.md and docs/training.md stay true: every link to lines of code still
points at the code it names (tools/relink.py), and every activation name the walkthrough
gives is one the models fire."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tinyformers import lens
from tinyformers.models import gpt2, llama

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "walkthrough.md"


def relink(*argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tools.relink", *argv]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)


# Each doc with code links: the fewest links it must keep, and files it must link to.
LINKED_DOCS = {
    "walkthrough.md": (50, {"tinyformers/models/gpt2.py", "tinyformers/models/llama.py"}),
    "training.md": (
        40,
        {
            "tinyformers/training/loss.py",
            "tinyformers/training/optim.py",
            "tinyformers/training/trainer.py",
            "tinyformers/training/data.py",
            "tinyformers/training/backward.py",
            "tinyformers/training/lora.py",
        },
    ),
}


@pytest.mark.parametrize("name", sorted(LINKED_DOCS))
def test_every_code_link_holds_its_fragment(name):
    doc = ROOT / "docs" / name
    run = relink("--check", str(doc))
    assert run.returncode == 0, f"stale links; `python -m tools.relink {doc}`:\n{run.stderr}"
    links = re.findall(r"\]\(\.\./(tinyformers/[\w/]+\.py)#L\d+", doc.read_text())
    fewest, files = LINKED_DOCS[name]
    assert len(links) >= fewest
    assert files <= set(links)


def test_a_stale_link_fails_the_check_and_relink_repoints_it(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "tinyformers").symlink_to(ROOT / "tinyformers")
    source = (ROOT / "tinyformers/models/attention.py").read_text().splitlines()
    line = 1 + next(i for i, s in enumerate(source) if "scores = q @ k.transpose" in s)
    doc = tmp_path / "docs" / "page.md"
    fragment = "scores = q @ k.transpose(-2, -1) * scale"
    doc.write_text(f"see [`{fragment}`](../tinyformers/models/attention.py#L{line - 3})\n")

    stale = relink("--check", str(doc))
    assert stale.returncode == 1 and f"is at #L{line}" in stale.stderr

    assert relink(str(doc)).returncode == 0
    assert doc.read_text() == f"see [`{fragment}`](../tinyformers/models/attention.py#L{line})\n"
    assert relink("--check", str(doc)).returncode == 0


def test_a_fragment_gone_from_the_code_is_reported_not_guessed(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text(f"[`attn = softmax(q k)`]({ROOT}/tinyformers/models/gpt2.py#L1)\n")
    run = relink(str(doc))
    assert run.returncode == 1 and "is nowhere in the file" in run.stderr
    assert "#L1)" in doc.read_text()


def test_every_activation_name_in_the_walkthrough_is_fired():
    small_gpt2 = gpt2.GPT2(
        gpt2.GPT2Config.from_dict(
            {"vocab_size": 16, "n_positions": 8, "n_embd": 8, "n_layer": 1, "n_head": 2}
        )
    )
    small_llama = llama.Llama(
        llama.LlamaConfig.from_dict(
            {
                "vocab_size": 16,
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
            }
        )
    )
    fired = set(lens.hook_names(small_gpt2)) | set(lens.hook_names(small_llama))
    named = re.findall(
        r"`((?:blocks\.L\.|ln_final\.)[\w.]+|hook_embed|hook_pos_embed)`", DOC.read_text()
    )
    assert len(set(named)) >= 15
    assert {n.replace("blocks.L.", "blocks.0.") for n in named} <= fired
