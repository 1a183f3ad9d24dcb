"""README's examples run as written, against the offline default model.

Every ```sh and ```python block is executed. The two set-up commands are checked against
.ci/run and run from their first command after the installs (installing is what the
environment running this test already did). Shell lines run in a scratch folder where
`./my-gpt2-folder` is a small GPT-2 checkpoint and `benchmarks/` is the repository's; a
line that opens the chat REPL runs in a pseudo-terminal. A comment that states a result
(`# [19556, 905]`, `# 30.94 for the default model`) is checked too. The Python blocks run
in order as one session, as a reader would type them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```(sh|python)\n(.*?)```", README, flags=re.DOTALL)
SETUP = [code.strip() for kind, code in BLOCKS[:2]]
SHELL_LINES = [
    line for kind, code in BLOCKS[2:] if kind == "sh" for line in code.splitlines() if line.strip()
]
PYTHON_BLOCKS = [code for kind, code in BLOCKS if kind == "python"]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, gpt2_small_dir) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    (folder / "my-gpt2-folder").symlink_to(gpt2_small_dir)
    (folder / "benchmarks").symlink_to(REPO / "benchmarks")
    return folder


def env() -> dict:
    # The README's commands run in the venv they install: its bin/ first on PATH.
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def test_readme_has_two_setup_commands_and_ci_runs_the_second():
    assert [kind for kind, _ in BLOCKS[:2]] == ["sh", "sh"]
    assert all(cmd.startswith("python3 -m venv .venv && ") for cmd in SETUP)
    assert SETUP[1].endswith("&& pytest")
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == SETUP[1]
    assert len(SHELL_LINES) >= 5 and PYTHON_BLOCKS


def after_installs(command: str) -> str:
    parts = command.split(" && ")
    last_install = max(i for i, p in enumerate(parts) if p.startswith(("pip install", ". .venv")))
    return " && ".join(parts[last_install + 1 :])


@pytest.mark.slow
def test_first_setup_command_chats_with_the_default_model(scratch):
    command = after_installs(SETUP[0])
    assert command.startswith('echo "What is the capital of France?" | tinyformers chat')
    run = subprocess.run(
        ["bash", "-c", command], cwd=scratch, env=env(), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout


@pytest.mark.slow
@pytest.mark.parametrize("line", SHELL_LINES)
def test_shell_example_runs(scratch, line):
    command = line.split("  #")[0].strip()
    if re.fullmatch(r"tinyformers chat( --\S+)*", command):  # the REPL: needs a terminal
        child = pexpect.spawn("bash", ["-c", command], cwd=str(scratch), env=env(),
                              encoding="utf-8", timeout=300)  # fmt: skip
        child.expect_exact(">>> ")
        child.sendline("Hello!")
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
        return
    run = subprocess.run(
        ["bash", "-c", command], cwd=scratch, env=env(), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip(), "an example that prints nothing"
    if stated := re.search(r"# ([\d.]+) for the default model", line):
        measured = float(run.stdout.split()[1])  # "perplexity 30.9359 over ..."
        assert f"{measured:.2f}" == stated[1], run.stdout


def with_checks(code: str) -> str:
    """`expr  # [1, 2]` becomes `assert expr == [1, 2]`: the comment is the expected value."""
    return re.sub(r"^(\S.*?)  # (\[[\d, ]+\])$", r"assert (\1) == \2, \1", code, flags=re.MULTILINE)


@pytest.mark.slow
def test_python_examples_run_as_one_session(scratch):
    """The blocks in order, as a reader types them: a later block uses the earlier `model`."""
    script = scratch / "examples.py"
    script.write_text("\n".join(with_checks(code) for code in PYTHON_BLOCKS))
    run = subprocess.run(
        [sys.executable, str(script)], cwd=scratch, env=env(), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
