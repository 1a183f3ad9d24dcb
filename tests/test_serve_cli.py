"""`tinyformers serve` as a command: it serves on 127.0.0.1, stops on Ctrl-C, and a model that
cannot load or a bad flag is one line on stderr and an exit code."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_serve import free_port

SERVE = [sys.executable, "-m", "tinyformers", "serve"]


def wait_for_health(process: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None and time.monotonic() < deadline
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return
        except httpx.ConnectError:  # not listening yet
            pass
        time.sleep(0.1)


def test_serve_answers_on_localhost_and_stops_on_ctrl_c(gpt2_small_dir):
    port = free_port()
    process = subprocess.Popen(
        [*SERVE, "--model", str(gpt2_small_dir), "--port", str(port), "--temp", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_health(process, port)
        body = {"prompt": "Hello", "max_tokens": 4}  # --temp 0 is the server's default
        first = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body).json()
        second = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body).json()
        assert first["choices"][0]["text"] == second["choices"][0]["text"]
        assert first["usage"]["completion_tokens"] == 4
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert f"http://127.0.0.1:{port}" in stderr and "Traceback" not in stderr


def test_a_model_that_cannot_load_is_one_error_line_and_exit_1(tmp_path):
    run = subprocess.run(
        [*SERVE, "--model", str(tmp_path / "missing"), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("tinyformers: error: ")
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("how", ["file", "environment"])
def test_the_api_key_comes_from_a_file_or_the_environment(gpt2_small_dir, tmp_path, how):
    """A key on the command line shows in `ps`: llama-server reads LLAMA_API_KEY, vLLM
    VLLM_API_KEY; ours reads --api-key-file's first line or TINYFORMERS_API_KEY."""
    port = free_port()
    argv = [*SERVE, "--model", str(gpt2_small_dir), "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "TINYFORMERS_API_KEY"}
    if how == "file":
        (tmp_path / "key").write_text("sesame\n")
        argv += ["--api-key-file", str(tmp_path / "key")]
    else:
        env["TINYFORMERS_API_KEY"] = "sesame"
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for_health(process, port)
        url = f"http://127.0.0.1:{port}/v1/models"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert "sesame" not in " ".join(process.args)  # nothing for `ps` to show
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)


def test_an_api_key_file_without_a_key_is_one_line(tmp_path):
    (tmp_path / "empty").write_text("\n")
    for flags in (["--api-key-file", str(tmp_path / "empty")],
                  ["--api-key-file", str(tmp_path / "missing")],
                  ["--api-key", "a", "--api-key-file", str(tmp_path / "empty")]):  # fmt: skip
        run = subprocess.run([*SERVE, *flags], capture_output=True, text=True, timeout=60)
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.strip().splitlines()[-1].startswith("tinyformers: error: ")


def test_bad_flags_exit_2_before_loading():
    for flags in (["--port", "70000"], ["--max-batch", "0"], ["--context", "1"]):
        run = subprocess.run([*SERVE, *flags], capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and "error:" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
def test_readme_serving_examples_run_against_the_command(tmp_path):
    """The README's Serving section: its first command serves, its curl and Python work."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Serving", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(bash|py)\n(.*?)```", section, flags=re.DOTALL)
    serve, curl, client = blocks[0][1], blocks[1][1], blocks[2][1]
    port = free_port()
    command = serve.splitlines()[0].split("#")[0].split()
    assert command == ["tinyformers", "serve"]
    process = subprocess.Popen(
        [*SERVE, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_health(process, port)
        here = {"cwd": tmp_path, "capture_output": True, "text": True, "timeout": 120}
        curl = curl.replace("8000", str(port))
        answer = json.loads(subprocess.run(["bash", "-c", curl], check=True, **here).stdout)
        assert "Paris" in answer["choices"][0]["message"]["content"]
        script = client.replace("8000", str(port))
        run = subprocess.run([sys.executable, "-c", script], **here)
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith("The capital of France is Paris.\n")
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)
