"""`tinyformers perplexity FILE`: the figure Hugging Face's loss gives, window by window."""

from __future__ import annotations

import math
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_gpt2
from test_cli_status import plain, run_with_terminal_stderr

import tinyformers

TEXT = (
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the "
    "tallest structure in Paris. Its base is square, measuring 125 metres on each side. "
    "During its construction, the Eiffel Tower surpassed the Washington Monument to become "
    "the tallest man-made structure in the world.\n"
)


@pytest.fixture(scope="module")
def reference():
    return hf_gpt2(n_layer=2)  # the same weights as gpt2_small_dir


def hf_window_sums(reference, ids: list[int], context: int, first: int) -> tuple[float, int]:
    """HF's summed loss over windows of `context` tokens, scoring from position `first`."""
    nll, scored = 0.0, 0
    for start in range(0, len(ids), context):
        window = torch.tensor([ids[start : start + context]])
        if window.shape[1] <= first:
            break
        with torch.no_grad():
            logits = reference(window).logits[0]
        nll += F.cross_entropy(logits[first - 1 : -1], window[0, first:], reduction="sum").item()
        scored += window.shape[1] - first
    return nll, scored


def measured(stdout: str) -> tuple[float, int]:
    m = re.fullmatch(r"perplexity ([\d.]+) over (\d+) tokens \(.*\)\n", stdout)
    assert m, stdout
    return float(m[1]), int(m[2])


def test_one_window_equals_exp_of_hf_loss(gpt2_small_dir, reference, tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    run = plain("perplexity", str(tmp_path / "text.txt"), "--model", str(gpt2_small_dir))
    assert run.returncode == 0 and run.stderr == "", run.stderr
    ids = tinyformers.load_tokenizer(gpt2_small_dir).encode(TEXT)
    with torch.no_grad():
        loss = reference(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    ppl, scored = measured(run.stdout)
    assert scored == len(ids) - 1
    assert ppl == pytest.approx(math.exp(loss), rel=1e-4)


@pytest.mark.parametrize("second_half", [False, True])
def test_windows_and_second_half_equal_hf(gpt2_small_dir, reference, tmp_path, second_half):
    (tmp_path / "text.txt").write_text(TEXT)
    args = ["perplexity", str(tmp_path / "text.txt"), "--model", str(gpt2_small_dir), "-c", "16"]
    run = plain(*args, *(["--second-half"] if second_half else []))
    assert run.returncode == 0, run.stderr
    ids = tinyformers.load_tokenizer(gpt2_small_dir).encode(TEXT)
    nll, scored = hf_window_sums(reference, ids, 16, first=8 if second_half else 1)
    ppl, n = measured(run.stdout)
    assert n == scored and ppl == pytest.approx(math.exp(nll / scored), rel=1e-4)


def test_progress_line_on_a_terminal(gpt2_small_dir, tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    code, out, err = run_with_terminal_stderr(
        "perplexity", str(tmp_path / "text.txt"), "--model", str(gpt2_small_dir), "-c", "32"
    )
    assert code == 0, err
    windows = math.ceil(len(tinyformers.load_tokenizer(gpt2_small_dir).encode(TEXT)) / 32)
    assert f"\rwindow {windows}/{windows}: " in err and out.startswith("perplexity ")


@pytest.mark.parametrize(
    "content, message",
    [(None, "not a regular file"), (b"\xff\xfe", "cannot read it as UTF-8 text"),
     (b"Hi", "too few to score")],
)  # fmt: skip
def test_unreadable_or_short_file_is_one_line_exit_1(gpt2_small_dir, tmp_path, content, message):
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_bytes(content)
    else:
        os.mkfifo(path)  # would block a reader forever
    run = plain("perplexity", str(path), "--model", str(gpt2_small_dir))
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert message in run.stderr and str(path) in run.stderr


def test_a_model_that_reads_bos_first_gets_it_at_every_window(gpt2_small_dir, reference, tmp_path):
    """As llama.cpp's perplexity does for Gemma: BOS heads each window, then every text token
    is scored (GPT-2 made to ask for BOS through its tokenizer_config.json)."""
    folder = tmp_path / "with-bos"
    shutil.copytree(gpt2_small_dir, folder)
    (folder / "tokenizer_config.json").write_text('{"add_bos_token": true}')
    (tmp_path / "text.txt").write_text(TEXT)
    run = plain("perplexity", str(tmp_path / "text.txt"), "--model", str(folder), "-c", "16")
    assert run.returncode == 0, run.stderr
    tokenizer = tinyformers.load_tokenizer(folder)
    ids, bos = tokenizer.encode(TEXT), tokenizer.bos_token_id
    nll, scored = 0.0, 0
    for start in range(0, len(ids), 15):  # 15 text tokens after BOS fill a 16-token window
        window = torch.tensor([[bos, *ids[start : start + 15]]])
        with torch.no_grad():
            logits = reference(window).logits[0]
        nll += F.cross_entropy(logits[:-1], window[0, 1:], reduction="sum").item()
        scored += window.shape[1] - 1
    ppl, n = measured(run.stdout)
    assert n == scored == len(ids)  # every text token scored, the first one from BOS
    assert ppl == pytest.approx(math.exp(nll / scored), rel=1e-4)  # fp32 sums in another order
