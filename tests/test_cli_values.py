"""The command line's front door: help, --version, a bare call, and every value checked at
parse time (one stderr line, exit 2, nothing loaded), `-t` as threads, stop-string escapes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

import tinyformers
from tinyformers.cli import COMMANDS
from tinyformers.cli.options import unescape

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, stdin: str | bytes | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tinyformers", *args],
        capture_output=True,
        text=not isinstance(stdin, bytes),
        input=stdin,
        timeout=300,
        **kwargs,
    )


# Help ---------------------------------------------------------------------------------------


def test_top_level_help_speaks_to_users_and_lists_every_command():
    run = cli("--help")
    assert run.returncode == 0 and run.stderr == ""
    assert run.stdout.startswith("usage: tinyformers")
    assert "Run GPT-2 and Llama-family language models on the CPU" in run.stdout
    assert "add_parser" not in run.stdout and "module" not in run.stdout  # no developer note
    for name in COMMANDS:
        assert f"\n    {name}" in run.stdout, name
    assert "examples:\n" in run.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_examples(command):
    run = cli(command, "--help")
    assert run.returncode == 0 and run.stderr == ""
    examples = run.stdout.split("examples:\n", 1)[1]
    assert f"tinyformers {command}" in examples


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_threads(command):
    assert "--threads N, -t N" in cli(command, "--help").stdout


def test_help_shows_the_defaults():
    out = cli("generate", "--help").stdout
    # argparse wraps long help lines: compare with the line breaks taken out
    flat = " ".join(out.split())
    for default in ("(default: 256)", "(default: 0.8)", "(default: 40)", "(default: 0.95)"):
        assert default in flat, default
    assert "(default: smollm2" in flat and "one per physical core" in flat


def test_version():
    run = cli("--version")
    assert run.returncode == 0 and run.stdout == f"tinyformers {tinyformers.__version__}\n"


def test_bare_call_shows_usage_and_points_to_help():
    run = cli()
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("usage: tinyformers")
    assert "`tinyformers --help` lists them" in run.stderr


@pytest.mark.parametrize("command", ["tokenize", "generate"])
def test_stdin_on_a_terminal_gets_a_hint(command, gpt2_small_dir):
    model = [] if command == "tokenize" else ["--model", str(gpt2_small_dir), "--temp", "0"]
    child = pexpect.spawn(
        sys.executable, ["-m", "tinyformers", command, *model], encoding="utf-8", timeout=120
    )
    child.expect_exact("from the terminal; end it with Ctrl-D")
    child.sendline("Hello")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


# Values checked at parse time ---------------------------------------------------------------

BAD_VALUES = [
    (["--temp", "1e-45"], "argument --temperature/--temp: 1e-45 is not 0 (greedy) or a number"),
    (["--temperature", "nan"], "argument --temperature/--temp: nan is not 0 (greedy)"),
    (["--temperature", "inf"], "argument --temperature/--temp: inf is not 0 (greedy)"),
    (["--repetition-penalty", "1e-300"], "1e-300 is not a number from 1e-06 to 1e+06"),
    (["--repetition-penalty", "nan"], "nan is not a number from 1e-06 to 1e+06"),
    (["--repetition-penalty", "2e6"], "2e6 is not a number from 1e-06 to 1e+06"),  # params.py's
    ([f"--stop={i}" for i in range(17)], "argument --stop: at most 16 stop strings"),
    (["--seed", str(2**64)], f"argument --seed: {2**64} is not an integer from 0 to 2**64 - 1"),
    (["--seed", "-1"], "argument --seed: -1 is not an integer from 0 to 2**64 - 1"),
    (["--seed", "1" * 5000], "is not an integer from 0 to 2**64 - 1"),  # past int()'s limit
    (["--device", "foo"], "argument --device: foo is not cpu, cuda or cuda:N"),
    (["--threads", "0"], "argument --threads/-t: 0 is not an integer from 1 to 1024"),
    (["-t", "0.8"], "-t is --threads, as in llama.cpp; the temperature is --temp"),
    (["--top-k", "-1"], "argument --top-k: -1 is not an integer >= 0"),
    (["--top-p", "nan"], "argument --top-p: nan is not in (0, 1]"),
    (["--min-p", "1"], "argument --min-p: 1 is not in [0, 1)"),
    (["-n", "0"], "argument --max-new-tokens/-n: 0 is not an integer > 0"),
    (["--stop", ""], "argument --stop: an empty stop string would stop before any text"),
    (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
]


@pytest.mark.parametrize("args, message", BAD_VALUES)
def test_generate_bad_value_is_one_line_exit_2(args, message):
    # No --model: the default would take seconds to load, so a parse-time refusal is fast.
    run = cli("generate", *args, "Hello")
    assert run.returncode == 2
    assert message in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert run.stdout == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["chat", "--seed", "x"], "argument --seed: 'x' is not an integer"),
        (["chat", "--device", "gpu"], "argument --device: gpu is not cpu, cuda or cuda:N"),
        (["tokenize", "-t", "many", "x"], "argument --threads/-t: 'many' is not an integer"),
        (["perplexity", "f.txt", "--context", "1"], "argument --context/-c: 1 is not an integer"),
        (["perplexity", "f.txt", "--threads", "2000"], "2000 is not an integer from 1 to 1024"),
    ],
)
def test_other_commands_check_values_too(args, message):
    run = cli(*args, stdin="")
    assert run.returncode == 2
    assert message in run.stderr and run.stderr.count("\n") == 1, run.stderr


@pytest.mark.parametrize("command", ["generate", "tokenize", "chat"])
def test_stdin_that_is_not_utf8_is_one_line_exit_1(command):
    run = cli(command, stdin=b"caf\xe9 \xff")
    assert run.returncode == 1
    assert run.stderr == b"tinyformers: error: stdin is not UTF-8 text (byte 0xe9 at offset 3)\n"


# -t is threads; stop strings take escapes ---------------------------------------------------


def test_dash_t_sets_threads_and_verbose_shows_them(gpt2_small_dir):
    run = cli("generate", "--model", str(gpt2_small_dir), "-t", "1", "--temp", "0", "-n", "3",
              "--verbose", "Hello")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "\nthreads: 1\n" in run.stderr


@pytest.mark.parametrize(
    "typed, meant",
    [
        (r"\n\n", "\n\n"),
        (r"a\tb", "a\tb"),
        (r"\\n", "\\n"),  # an escaped backslash, then a plain n
        (r"\x41\x7e", "A~"),
        (r"\q", "\\q"),  # not an escape: kept as typed, as llama.cpp does
        ("trailing\\", "trailing\\"),
        ("é\\n", "é\n"),
    ],
)
def test_unescape_follows_llama_cpp(typed, meant):
    assert unescape(typed) == meant


@pytest.mark.slow
def test_stop_newline_escape_stops_at_the_first_newline():
    """Typed in a shell, `--stop "\\n"` is backslash + n: it must stop at a real newline."""
    prompt = "Q: What is the capital of France?\nA:"
    full = cli("generate", "--temp", "0", "-n", "16", prompt)
    assert full.returncode == 0, full.stderr
    assert "\n" in full.stdout.strip()  # else the test could not fail
    cut = cli("generate", "--temp", "0", "-n", "16", "--stop", r"\n", prompt)
    assert cut.returncode == 0, cut.stderr
    assert cut.stdout == full.stdout.split("\n")[0] and cut.stdout
