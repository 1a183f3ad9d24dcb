"""Generation against Hugging Face transformers' `generate` and logits processors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import hf_gpt2, left_padded_batch

import tinyformers
from tinyformers.generation import sampling as S
from tinyformers.generation.generate import StopText
from tinyformers.generation.params import SamplingParams

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def model(gpt2_small_dir):
    return tinyformers.load(gpt2_small_dir)


@pytest.fixture(scope="module")
def reference():
    return hf_gpt2(n_layer=2)  # the same weights as gpt2_small_dir


def test_greedy_ids_equal_hf_generate_batched_and_unbatched(model, reference):
    ids, mask = left_padded_batch([6, 11, 3], 50257, seed=7)
    with torch.no_grad():
        hf = reference.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=64, do_sample=False, pad_token_id=0
        )[:, ids.shape[1] :].tolist()
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
    ours = model.generate_ids(prompts, 64, **GREEDY)
    assert ours == [row[: len(o)] for row, o in zip(hf, ours, strict=True)]
    assert [len(o) for o in ours] == [64, 64, 64]  # no EOS in this random model's greedy path
    for prompt, row in zip(prompts, ours, strict=True):
        assert model.generate_ids(prompt, 64, **GREEDY) == row


def test_cached_decode_logits_equal_full_recompute(model):
    net = model.net
    ids, mask = left_padded_batch([5, 8], 50257, seed=8)
    new = torch.randint(0, 50257, (2, 6), generator=torch.Generator().manual_seed(0))
    total = ids.shape[1] + new.shape[1]
    full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    with torch.inference_mode():
        cache = net.make_cache(2, total)
        T = ids.shape[1]
        net(ids, full_mask, cache=cache, input_pos=torch.arange(T))
        full = net(torch.cat([ids, new], dim=1), full_mask)  # no cache: everything at once
        for step in range(new.shape[1]):
            pos = torch.tensor([T + step])
            step_logits = net(new[:, step : step + 1], full_mask, cache=cache, input_pos=pos)
            diff = (step_logits[:, 0] - full[:, T + step]).abs().max().item()
            assert diff <= 1e-4, f"step {step}: {diff}"  # issue: 1e-4 in float32


def test_same_seed_same_text_and_top_k_1_is_greedy(model):
    a = model.generate("The meaning of life is", 24, temperature=1.0, seed=3)
    b = model.generate("The meaning of life is", 24, temperature=1.0, seed=3)
    c = model.generate("The meaning of life is", 24, temperature=1.0, seed=4)
    assert a == b and a != c
    greedy = model.generate("The meaning of life is", 24, **GREEDY)
    assert model.generate("The meaning of life is", 24, temperature=1.3, top_k=1, seed=5) == greedy


# Each logits transform against HF's own LogitsProcessor on random logits ---------------------


def random_logits(seed=0, batch=4, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * 3


def test_temperature_equals_hf():
    from transformers.generation.logits_process import TemperatureLogitsWarper

    logits = random_logits(1)
    ours = S.process_logits(logits, SamplingParams(0.7, 0, 1.0, 0.0), None)
    assert torch.allclose(ours, TemperatureLogitsWarper(0.7)(None, logits.clone()), atol=0)


@pytest.mark.parametrize("k", [1, 5, 50, 1000, 5000])
def test_top_k_equals_hf(k):
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = random_logits(2)
    assert torch.equal(S.top_k(logits, k), TopKLogitsWarper(k)(None, logits.clone()))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999, 1.0])
def test_top_p_equals_hf(p):
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = random_logits(3)
    assert torch.equal(S.top_p(logits, p), TopPLogitsWarper(p)(None, logits.clone()))


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.99])
def test_min_p_equals_hf(p):
    from transformers.generation.logits_process import MinPLogitsWarper

    logits = random_logits(4)
    assert torch.equal(S.min_p(logits, p), MinPLogitsWarper(p)(None, logits.clone()))


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_equals_hf(penalty):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = random_logits(5)
    history = torch.randint(0, 1000, (4, 30), generator=torch.Generator().manual_seed(1))
    expected = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    assert torch.equal(S.repetition_penalty(logits, history, penalty), expected)


def test_full_chain_equals_hf_processor_list():
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = random_logits(6)
    history = torch.randint(0, 1000, (4, 20), generator=torch.Generator().manual_seed(2))
    hf = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.2),
            TemperatureLogitsWarper(0.9),
            TopKLogitsWarper(40),
            TopPLogitsWarper(0.95),
            MinPLogitsWarper(0.05),
        ]
    )(history, logits.clone())
    ours = S.process_logits(logits, SamplingParams(0.9, 40, 0.95, 0.05, 1.2), history)
    torch.testing.assert_close(ours, hf, rtol=0, atol=0)


def test_bad_sampling_values_are_rejected():
    for bad, match in [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": 1}, "min_p"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)


def test_the_library_refuses_past_the_limits_the_cli_and_server_share(model):
    """generation/params.py holds each limit once; the CLI and the server read them there."""
    from tinyformers.cli import options
    from tinyformers.generation import params
    from tinyformers.serve import protocol

    assert options.MAX_SEED is protocol.MAX_SEED is params.MAX_SEED
    assert protocol.MAX_STOP is params.MAX_STOP == 16
    with pytest.raises(ValueError, match="stop: at most 16 stop strings, got 17"):
        model.generate("Hi", 2, stop=[str(i) for i in range(17)])
    with pytest.raises(ValueError, match="repetition_penalty must be in"):
        SamplingParams(repetition_penalty=params.MAX_PENALTY * 2)


def test_options_are_checked_as_keyword_parameters(model):
    """generate, stream and generate_ids take one TypedDict of options (lm.py): a misspelt
    or foreign keyword fails as it would on a parameter list, before any token is made."""
    with pytest.raises(TypeError, match=r"generate\(\) got an unexpected keyword argument 'temp'"):
        model.generate("Hi", 2, temp=0)
    with pytest.raises(TypeError, match=r"stream\(\) got an unexpected keyword argument 'stop_'"):
        next(model.stream("Hi", 2, stop_="x"))
    with pytest.raises(
        TypeError, match=r"generate_ids\(\) got an unexpected keyword argument 'stop'"
    ):
        model.generate_ids([1, 2], 2, stop="x")  # stop strings need text
    with pytest.raises(ValueError, match="temperature must be"):
        model.generate_ids([1, 2], 2, temperature=-1)
    text = model.generate("Hi", 3, temperature=0, truncate=True, stop=None, seed=None)
    assert text == model.generate("Hi", 3, **GREEDY)  # every option accepted; greedy both times


# Stopping and streaming -----------------------------------------------------------------------


def test_stop_string_split_across_tokens_stops_and_is_trimmed(model):
    prompt = "Once upon a time"
    ids = model.generate_ids(model.tokenizer.encode(prompt), 30, temperature=1.0, seed=11)
    pieces = [model.tokenizer.decode([t]) for t in ids]
    full = "".join(pieces)
    # A stop string made of the end of one token and the start of the next.
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and pieces[i + 1])
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    assert full.find(stop) == len("".join(pieces[: k + 1])) - 2  # first occurrence spans k, k+1
    out = model.generate(prompt, 30, temperature=1.0, seed=11, stop=[stop])
    assert out == full[: full.find(stop)]
    streamed = list(model.stream(prompt, 30, temperature=1.0, seed=11, stop=[stop]))
    assert "".join(streamed) == out
    assert model.last_stats.new_tokens == k + 2  # generation ended at the token completing it


def test_eos_stops_each_row_on_its_own(model):
    prompts = ["Hello there", "A much longer prompt about the weather today"]
    free = model.generate_ids([model.tokenizer.encode(p) for p in prompts], 12, **GREEDY)
    model.eos_ids = {free[0][4]}  # pretend row 0's fifth token is EOS
    try:
        stopped = model.generate_ids([model.tokenizer.encode(p) for p in prompts], 12, **GREEDY)
        texts = model.generate(prompts, 12, **GREEDY)
    finally:
        model.eos_ids = {50256}
    first = free[0].index(free[0][4])
    assert stopped[0] == free[0][: first + 1]  # ends with the EOS token
    assert texts[0] == model.tokenizer.decode(free[0][:first])  # the text leaves EOS out
    eos_in_row1 = free[1].index(free[0][4]) if free[0][4] in free[1] else len(free[1]) - 1
    assert stopped[1] == free[1][: eos_in_row1 + 1]


def test_streamed_deltas_concatenate_to_generated_text(model):
    options = {"temperature": 0.9, "seed": 2, "top_k": 0, "min_p": 0.0}
    text = model.generate("In the beginning", 40, **options)
    deltas = list(model.stream("In the beginning", 40, **options))
    assert "".join(deltas) == text and len(deltas) > 5


def test_stop_text_holds_back_a_possible_stop_start():
    class Chars:  # a tokenizer whose tokens are characters
        def decoder(self):
            return type("D", (), {"feed": lambda _, t: chr(t), "flush": lambda _: ""})()

    out = StopText(Chars(), ["END"])
    shown = [out.add(ord(c)) for c in "abcENxyE"]
    assert shown == ["a", "b", "c", "", "", "ENx", "y", ""]
    assert out.add(ord("N")) == "" and out.add(ord("D")) == "" and out.stopped
    assert out.finish() == "" and out.text == "abcENxy"


def test_context_overflow_is_an_error_unless_truncated(model):
    long_prompt = " word" * 1100
    with pytest.raises(tinyformers.ContextLengthError, match="exceeds the model's context of 1024"):
        model.generate(long_prompt, 10)
    out = model.generate_ids(model.tokenizer.encode(long_prompt), 10, truncate=True, **GREEDY)
    tail = model.tokenizer.encode(long_prompt)[-(1024 - 10) :]
    assert out == model.generate_ids(tail, 10, **GREEDY)


# The CLI -----------------------------------------------------------------------------------


def cli(*args, stdin: str | None = None):
    return subprocess.run(
        [sys.executable, "-m", "tinyformers", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
    )


def test_cli_greedy_equals_hf_greedy(gpt2_small_dir, reference):
    run = cli("generate", "--model", str(gpt2_small_dir), "--temperature", "0",
              "--max-new-tokens", "20", "Hello")  # fmt: skip
    assert run.returncode == 0, run.stderr
    tok = tinyformers.load(gpt2_small_dir).tokenizer
    ids = torch.tensor([tok.encode("Hello")])
    with torch.no_grad():
        hf = reference.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert run.stdout == tok.decode(hf[0, 1:].tolist())
    assert run.stderr == ""


def test_cli_reads_stdin_and_echoes(gpt2_small_dir):
    run = cli("generate", "--model", str(gpt2_small_dir), "--temp", "0", "-n", "5", "--echo",
              stdin="Hello\n")  # fmt: skip
    direct = cli("generate", "--model", str(gpt2_small_dir), "--temp", "0", "-n", "5", "Hello")
    assert run.returncode == 0 and run.stdout == "Hello" + direct.stdout


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--temperature", "-1"], 2, "argument --temperature/--temp: -1 is not 0 (greedy) or a"),
        (["--top-p", "1.5"], 2, "argument --top-p: 1.5 is not in (0, 1]"),
        (["--top-p", "0"], 2, "argument --top-p: 0 is not in (0, 1]"),
        (["--max-new-tokens", "0"], 2, "argument --max-new-tokens/-n: 0 is not an integer > 0"),
        (["--frobnicate"], 2, "unrecognized arguments: --frobnicate"),
        (["--model", "/no/such/model"], 1, "/no/such/model: no such file or folder"),
        (["-n", "2000"], 1, "exceeds the model's context of 1024 tokens"),
    ],
)
def test_cli_bad_values_give_one_line_and_exit_code(gpt2_small_dir, args, code, message):
    if "--model" not in args:
        args = ["--model", str(gpt2_small_dir), *args]
    run = cli("generate", *args, "Hello")
    assert run.returncode == code
    assert message in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""


def test_cli_uncached_name_offline_exits_1(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = cli("generate", "--model", "gpt2-medium", "Hello")
    assert run.returncode == 1 and run.stderr.count("\n") == 1
    assert "not in the Hugging Face cache" in run.stderr and "local folder" in run.stderr
