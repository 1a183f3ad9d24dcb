"""No silent waits and honest figures: status lines on a terminal's stderr with stdout left
clean, compile warm-up timed apart from decode, the chat banner, multi-line chat input, /stats."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import time

import pexpect
import pytest
from test_chat_repl import PROMPT, spawn_chat, tiny_chat  # noqa: F401  (tiny_chat: a fixture)

import tinyformers
from tinyformers.cli import chat as chat_cli
from tinyformers.generation.generate import generate_tokens
from tinyformers.generation.params import SamplingParams

GREEDY = SamplingParams(temperature=0)


def run_with_terminal_stderr(*args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the CLI with stderr on a pseudo-terminal, stdout a pipe."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinyformers", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        err += chunk
    out = proc.stdout.read()
    os.close(master)
    return proc.wait(timeout=300), out.decode(), err.decode().replace("\r\n", "\n")


def plain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tinyformers", *args], capture_output=True, text=True, timeout=300
    )


# Status lines -------------------------------------------------------------------------------


def test_loading_line_on_a_terminal_stderr_and_stdout_stays_the_text(gpt2_small_dir):
    args = ("generate", "--model", str(gpt2_small_dir), "--temp", "0", "-n", "5", "Hello")
    code, out, err = run_with_terminal_stderr(*args)
    piped = plain(*args)
    assert code == 0 and piped.returncode == 0, err
    assert f"loading {gpt2_small_dir} ...\n" in err
    assert out == piped.stdout and out  # the same text, and nothing else, on stdout
    assert piped.stderr == ""  # piped stderr gets no status, only errors


@pytest.mark.slow
def test_compile_says_so_and_its_warmup_is_apart_from_decode(gpt2_small_dir):
    args = ("generate", "--model", str(gpt2_small_dir), "--temp", "0", "-n", "6", "Hello")
    code, out, err = run_with_terminal_stderr(*args, "--compile", "--verbose")
    assert code == 0, err
    assert "--compile: the first answer compiles the decode step" in err
    warmup = re.search(r"compile warm-up: ([\d.]+) s \(first decode step\)", err)
    decode = re.search(r"generated: 6 tokens, decode ([\d.]+) tok/s", err)
    assert warmup and decode, err
    assert out == plain(*args).stdout  # compiled decode gives the same greedy text


class SlowFirstCall:
    """A decode step that takes `delay` s longer on its first call, as a compile does."""

    def __init__(self, net, delay: float) -> None:
        self.net, self.delay, self.calls = net, delay, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            time.sleep(self.delay)
        return self.net(*args, **kwargs)


def test_warmup_step_is_timed_apart_and_only_once(gpt2_small_dir):
    model = tinyformers.load(gpt2_small_dir)
    # 2 s: well above 6 real steps of this 2-layer model, even on a loaded 2-core machine
    decode = SlowFirstCall(model.net, delay=2.0)
    first, second = model.last_stats.__class__(), model.last_stats.__class__()
    for stats in (first, second):
        steps = generate_tokens(
            model.net, [[1, 2, 3]], 8, GREEDY, set(), stats=stats, decode=decode
        )
        assert len(list(steps)) == 8
    assert first.warmup_seconds >= 2.0
    assert first.decode_seconds < first.warmup_seconds  # 6 fast steps, the slow one left out
    assert first.decode_tokens_per_second == pytest.approx(6 / first.decode_seconds)
    assert second.warmup_seconds == 0  # warm now: every step counts as decode
    assert second.decode_tokens_per_second == pytest.approx(7 / second.decode_seconds)


# Chat -----------------------------------------------------------------------------------------


def test_chat_banner_names_the_model_its_format_and_context(tiny_chat):  # noqa: F811
    folder = tiny_chat[0]
    child = pexpect.spawn(
        sys.executable,
        ["-m", "tinyformers", "chat", "--model", str(folder), "--temp", "0", "-n", "4"],
        encoding="utf-8",
        timeout=120,
    )
    child.expect_exact(PROMPT)
    banner = child.before.replace("\r\n", "\n")
    assert f"loading {folder} ...\n" in banner
    weights = tinyformers.load(folder).info()["weights: matrices"]
    assert f"{folder.name}: GPT2, {weights}, 64-token context\n" in banner, banner
    assert chat_cli.PASTE_ON in banner  # the terminal is asked to mark pastes
    child.sendeof()
    child.expect(pexpect.EOF)


def answers_until_stats(child: pexpect.spawn) -> str:
    """Everything printed between the end of the sent message and /stats's report."""
    child.expect_exact(PROMPT)  # the answer to the message, then a fresh prompt
    shown = child.before
    time.sleep(0.5)  # room for any further answer to start printing
    child.sendline("/stats")
    child.expect(r"generated: \d+ tokens, decode [\d.]+ tok/s")
    return shown + child.before


def test_bracketed_paste_of_three_lines_is_one_message(tiny_chat):  # noqa: F811
    child = spawn_chat("--model", str(tiny_chat[0]), "--temp", "0", "-n", "4")
    assert "no answer yet" in chat_say(child, "/stats")
    child.send("\x1b[200~line one\nline two\nline three\x1b[201~")
    child.send("\r")
    shown = answers_until_stats(child)
    # Three messages would have been three answers, the later two followed by prompts here.
    assert shown.count(PROMPT) == 0 and "line three" in shown, shown
    child.sendeof()
    child.expect(pexpect.EOF)


def test_triple_quote_block_is_one_message(tiny_chat):  # noqa: F811
    child = spawn_chat("--model", str(tiny_chat[0]), "--temp", "0", "-n", "4")
    child.sendline('"""first line')
    child.expect_exact(chat_cli.MORE)
    child.sendline("second line")
    child.expect_exact(chat_cli.MORE)
    child.sendline('third line"""')
    shown = answers_until_stats(child)
    assert shown.count(PROMPT) == 0 and chat_cli.MORE not in shown, shown
    child.sendeof()
    child.expect(pexpect.EOF)


def chat_say(child: pexpect.spawn, line: str) -> str:
    child.sendline(line)
    child.expect_exact(PROMPT)
    return child.before


@pytest.mark.parametrize(
    "lines, message",
    [
        (["plain"], "plain"),
        (["\x1b[200~a", "b", "c\x1b[201~"], "a\nb\nc"),  # markers as text: no readline
        (["\x1b[200~one line\x1b[201~"], "one line"),
        (['"""a', "b", 'c"""'], "a\nb\nc"),
        (['"""', "a", '"""'], "a"),
        (['"""inline"""'], "inline"),
    ],
)
def test_read_message_joins_pastes_and_blocks(monkeypatch, lines, message):
    feed = iter(lines)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(feed))
    assert chat_cli.read_message() == message
    assert next(feed, None) is None  # every line was taken, none more
