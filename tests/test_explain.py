"""`tinyformers explain`: its tables hold the library's own numbers, its files open offline.

One subprocess run per model (a 2-layer GPT-2 folder with the real vocab, and SmolLM2)
feeds the tests; each checks what a learner reads against `model(ids)`, `logit_lens` and
`run_with_cache` computed here.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import smollm2_gguf

import tinyformers
from tinyformers.cli import main
from tinyformers.explain import explain, head_scores, most_interesting_head, piece_label

GPT2_PROMPT = "Hello, my dog is a"
LAYER, HEAD = 1, 3  # the head whose pattern the GPT-2 run prints


def explain_cli(tmp: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}  # the lens table in one block
    command = [sys.executable, "-m", "tinyformers", "explain", *argv, "--out", str(tmp)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def gpt2_run(gpt2_small_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("explain-gpt2")
    argv = ["--model", str(gpt2_small_dir), "--top-k", "5", "--layer", str(LAYER)]
    run = explain_cli(out, GPT2_PROMPT, *argv, "--head", str(HEAD))
    model = tinyformers.load(gpt2_small_dir, fast=False)  # as explain loads it
    return run, out, model


def section(stdout: str, first_line_start: str) -> list[str]:
    """The lines of the table whose first line starts with `first_line_start`."""
    blocks = [b.splitlines() for b in stdout.split("\n\n")]
    return next(b for b in blocks if b[0].startswith(first_line_start))


def next_token_rows(stdout: str) -> list[tuple[int, str, int, float, float]]:
    """(rank, piece, id, probability, logit) of the next-token table."""
    rows = section(stdout, "next token after")[2:]
    return [(int(r), p, int(i), float(pr), float(lg)) for r, p, i, pr, lg in map(str.split, rows)]


def lens_rows(stdout: str) -> list[list[tuple[str, int]]]:
    """[layer][position] -> (piece, probability in %) of the logit-lens table."""
    rows = section(stdout, "logit lens")[4:]  # two header lines, then `pos` and the pieces
    out = []
    for line in rows:
        cells = line.split()[1:]
        out.append([(cells[i], int(cells[i + 1])) for i in range(0, len(cells), 2)])
    return out


def test_stdout_holds_only_the_tables_and_stderr_says_what_was_written(gpt2_run):
    run, out, _ = gpt2_run
    assert run.returncode == 0, run.stderr
    # status lines only for a terminal or --verbose; what --out wrote, always
    assert re.fullmatch(
        rf"wrote 2 PNGs \({re.escape(str(out / 'layer_00.png'))} to layer_01.png\) and "
        rf"{re.escape(str(out / 'attention.html'))} in \d+\.\d\d s; "
        r"the page opens on layer \d head \d+\n",
        run.stderr,
    ), run.stderr
    titles = [block.splitlines()[0] for block in run.stdout.split("\n\n")]
    assert [t.split()[0] for t in titles] == ["tokens:", "next", "logit", "attention"]


def test_tokens_are_the_tokenizers(gpt2_run):
    run, _, model = gpt2_run
    ids = model.tokenizer.encode(GPT2_PROMPT)
    rows = [line.split() for line in section(run.stdout, "tokens:")[2:]]
    assert rows == [
        [str(pos), str(i), piece_label(model.tokenizer, i)] for pos, i in enumerate(ids)
    ]
    assert rows[2] == ["2", "616", "␣my"]  # GPT-2's id for " my", its space drawn


def test_next_token_table_is_softmax_of_the_last_logits(gpt2_run):
    run, _, model = gpt2_run
    logits = model(torch.tensor([model.tokenizer.encode(GPT2_PROMPT)]))[0, -1]
    probs = torch.softmax(logits, -1)
    top = probs.topk(5)
    rows = next_token_rows(run.stdout)
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0][2] == top.indices[0].item()
    assert rows[0][1] == piece_label(model.tokenizer, rows[0][2])
    for (_, _, i, p, logit), q in zip(rows, top.values.tolist(), strict=True):
        assert p == pytest.approx(q, rel=1e-3)  # printed with 4 significant digits
        assert logit == pytest.approx(logits[i].item(), abs=1e-3)
        assert p == pytest.approx(probs[i].item(), rel=1e-3)


def test_logit_lens_table_matches_logit_lens(gpt2_run):
    run, _, model = gpt2_run
    lens = torch.softmax(model.logit_lens(GPT2_PROMPT), -1)  # (n_layer + 1, T, V)
    probs, ids = lens.max(-1)
    table = lens_rows(run.stdout)
    assert len(table) == model.config.n_layer + 1
    for layer, row in enumerate(table):
        for pos, (piece, percent) in enumerate(row):
            expected = piece_label(model.tokenizer, ids[layer, pos].item())
            assert piece == (expected if len(expected) <= 8 else expected[:7] + "…")
            assert abs(percent - 100 * probs[layer, pos].item()) <= 0.5 + 1e-3  # rounded
    # the last row, last position: the model's own next token
    assert table[-1][-1][0] == next_token_rows(run.stdout)[0][1][:8]


def test_pattern_table_is_the_heads_pattern(gpt2_run):
    run, _, model = gpt2_run
    _, cache = model.run_with_cache(GPT2_PROMPT)
    pattern = cache["pattern", LAYER][0, HEAD]  # (T, T)
    lines = section(run.stdout, f"attention of layer {LAYER}, head {HEAD}")[2:]
    for q, line in enumerate(lines):
        weights = [int(w) for w in line.split()[2:]]
        assert len(weights) == q + 1  # a token attends to itself and the earlier ones only
        expected = [100 * w for w in pattern[q, : q + 1].tolist()]
        assert weights == pytest.approx(expected, abs=0.5 + 1e-3)  # printed rounded


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_one_png_per_layer(gpt2_run):
    _, out, model = gpt2_run
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [f"layer_{i:02d}.png" for i in range(model.config.n_layer)]
    for path in pngs:
        width, height = png_size(path)
        assert 400 <= width <= 4000 and 300 <= height <= 4000, (path, width, height)


def html_data(path: Path) -> dict:
    page = path.read_text(encoding="utf-8")
    assert not re.search(r"https?://", page)  # no CDN, no fonts, no links out
    assert not re.search(r"<(script|img|iframe)[^>]*\ssrc=|<link\b", page)
    blob = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)
    return json.loads(blob[1])


def test_html_page_is_self_contained_and_holds_every_pattern(gpt2_run):
    _, out, model = gpt2_run
    data = html_data(out / "attention.html")
    _, cache = model.run_with_cache(GPT2_PROMPT)
    assert data["ids"] == model.tokenizer.encode(GPT2_PROMPT)
    assert len(data["patterns"]) == model.config.n_layer
    for layer, heads in enumerate(data["patterns"]):
        pattern = cache["pattern", layer][0]  # (H, T, T)
        assert len(heads) == pattern.shape[0]
        for h, rows in enumerate(heads):
            for q, row in enumerate(rows):  # the causal half: keys 0..q
                assert row == pytest.approx(pattern[h, q, : q + 1].tolist(), abs=1e-4)


def test_head_scores_say_how_sharply_a_head_looks_at_one_other_token():
    T = 5
    sink = torch.zeros(T, T)
    sink[:, 0] = 1  # every token looks at the first one
    itself = torch.eye(T)  # every token looks at itself
    previous = torch.zeros(T, T)
    previous[0, 0] = 1
    previous[torch.arange(1, T), torch.arange(T - 1)] = 1  # each looks at the one before it
    uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
    scores = head_scores(torch.stack([sink, itself, previous, uniform]))
    # queries 2, 3, 4 have 3, 4, 5 keys: uniform gives each other key 1/3, 1/4, 1/5
    assert scores.tolist() == pytest.approx([0, 0, 1, (1 / 3 + 1 / 4 + 1 / 5) / 3])
    assert head_scores(torch.ones(2, 2, 2)).tolist() == [0, 0]  # too short to tell heads apart
    tie = {0: torch.stack([sink, itself]), 1: torch.stack([sink])}
    assert most_interesting_head(tie) == (0, 0)  # the first of equal scores
    layers = {0: torch.stack([uniform]), 3: torch.stack([sink, uniform, previous])}
    assert most_interesting_head(layers) == (3, 2)


def test_html_page_opens_on_the_head_that_looks_hardest_at_one_other_token(gpt2_run):
    _, out, model = gpt2_run
    data = html_data(out / "attention.html")
    _, cache = model.run_with_cache(GPT2_PROMPT)
    best, start = -1.0, None
    for layer in range(model.config.n_layer):
        for head, pattern in enumerate(cache["pattern", layer][0]):  # (T, T) each
            # from position 2 on, each query's largest weight on a key other than 0 and itself
            sharp = [max(pattern[q, 1:q].tolist()) for q in range(2, len(pattern))]
            if sum(sharp) / len(sharp) > best:
                best, start = sum(sharp) / len(sharp), [layer, head]
    assert data["start"] == start
    assert start != [0, 0]  # this checkpoint's 0/0 is not its liveliest head
    page = (out / "attention.html").read_text()
    assert "layerSel.value = D.layers.indexOf(D.start[0]); headSel.value = D.start[1];" in page


def test_png_colour_bar_names_the_square_root_scale(gpt2_small_dir):
    from tinyformers.explain.png import layer_figure

    model = tinyformers.load(gpt2_small_dir, fast=False)
    fig, _, _ = layer_figure(explain(model, GPT2_PROMPT))
    bar = fig.axes[-1]  # the colour bar's axes, added last
    assert bar.get_ylabel() == "attention weight (colour: square-root scale)"
    assert [t.get_text() for t in bar.get_yticklabels()][:3] == ["0.00", "0.01", "0.05"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--top-k", "0"], "--top-k: 0 is not an integer from 1 to 1000"),
        (["--head", "1"], "--head needs --layer"),
        (["--layer", "-1"], "--layer: -1 is not an integer >= 0"),
        (["--layer", "2"], "--layer 2 is out of range: layers are 0 to 1"),
        (["--layer", "1", "--head", "12"], "--head 12 is out of range: heads are 0 to 11"),
    ],
)
def test_bad_flags_exit_2_with_one_line(gpt2_small_dir, capsys, argv, expected):
    try:  # argparse exits for a malformed value; a range the model sets is checked after loading
        code = main(["explain", "--model", str(gpt2_small_dir), "Hi", *argv])
    except SystemExit as e:
        code = e.code
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and expected in captured.err, captured.err


@pytest.mark.slow
def test_smollm2_explains_the_capital_of_france(tmp_path):
    prompt = "The capital of France is"
    run = explain_cli(tmp_path, prompt)
    assert run.returncode == 0, run.stderr
    model = tinyformers.load(smollm2_gguf())
    probs = torch.softmax(model(torch.tensor([model.tokenizer.encode(prompt)]))[0, -1], -1)
    rank1 = next_token_rows(run.stdout)[0]
    assert (rank1[1], rank1[2]) == ("␣Paris", probs.argmax().item())
    assert rank1[3] == pytest.approx(probs.max().item(), rel=1e-3)
    assert lens_rows(run.stdout)[-1][-1] == ("␣Paris", round(100 * rank1[3]))
    n_layer = model.config.num_hidden_layers
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        f"layer_{i:02d}.png" for i in range(n_layer)
    ]
    assert all(png_size(p)[0] >= 400 for p in tmp_path.glob("*.png"))
    data = html_data(tmp_path / "attention.html")
    assert len(data["patterns"]) == n_layer and len(data["patterns"][0]) == 9  # 9 query heads


def test_a_prompt_too_long_to_show_exits_1_with_one_line(gpt2_small_dir, capsys):
    code = main(["explain", "--model", str(gpt2_small_dir), " word" * 300])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert captured.err == (
        "tinyformers: error: the prompt is 300 tokens; explain takes at most 256 "
        "(a table column and a heat-map row per token)\n"
    )
