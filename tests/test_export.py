"""`save_pretrained` writes a Hugging Face checkpoint folder that both readers take back:
- every architecture of tests/test_models.py's CASES (and its feature switched off, and the
  config fields no case sets): HF's `AutoModelForCausalLM.from_pretrained` gives our logits
  within 1e-4 in fp32, and our `load_model` gives the same config and tensors, bit for bit;
- the real SmolLM2-135M and Gemma 3 270M GGUFs, dequantized and saved: HF's eager attention
  gives the logits of our written-out math (fast=False) within 1e-4 (measured: bit-equal);
- a save that fails (a file-size limit standing in for a full disk) leaves the old file whole;
- a model packed for our CPU kernels is refused with one line.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import gemma3_gguf, hf_logits, left_padded_batch
from test_models import CASES, PROMPTS, VOCAB, config_json, hf_model, ours
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

import tinyformers
from tinyformers.errors import TinyformersError
from tinyformers.kernels.modules import pack_model
from tinyformers.loading.export import save_pretrained
from tinyformers.loading.loader import build, load_model
from tinyformers.models import llama

# (case, HF config overrides): each case as test_models builds it, with its feature off, and
# the fields no case sets (GPT-2's n_inner, activation and attention flags; untied heads).
VARIANTS = {name: (name, {}) for name in CASES}
VARIANTS |= {f"{name}-off": (name, case.off) for name, case in CASES.items() if case.off}
VARIANTS["gpt2-untied-gelu"] = (
    "gpt2",
    {"n_inner": 80, "activation_function": "gelu", "tie_word_embeddings": False}
    | {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True},
)
VARIANTS["gemma3-untied"] = ("gemma3_text", {"tie_word_embeddings": False})


def hf_reload(folder: Path) -> torch.nn.Module:
    """HF's model of `folder` in fp32, eager attention; every tensor in the file used, none
    missing (HF would fill a missing one at random)."""
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def assert_hf_matches(net: torch.nn.Module, folder: Path) -> None:
    """HF's model of `folder` gives `net`'s logits on a left-padded batch within 1e-4."""
    ids, mask = left_padded_batch(PROMPTS, VOCAB)
    with torch.inference_mode():
        expected = net(ids, mask)
    error = (hf_logits(hf_reload(folder), ids, mask) - expected)[mask.bool()].abs().max()
    assert error <= 1e-4, error  # ours (SDPA) vs HF eager, fp32: measured <= 6e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_folder_loads_in_hf_and_in_ours_alike(variant, tmp_path):
    name, overrides = VARIANTS[variant]
    net = ours(CASES[name], hf_model(CASES[name], **overrides))
    save_pretrained(net, tmp_path)
    assert_hf_matches(net, tmp_path)
    generation = GenerationConfig.from_pretrained(tmp_path)
    assert (generation.bos_token_id, generation.eos_token_id) == (
        net.config.bos_token_id,
        net.config.eos_token_id,
    )
    back, _ = load_model(tmp_path)
    assert back.config == net.config  # every field read back as written
    assert_same_state(back, net)  # float32 in the file: bit for bit


@pytest.mark.parametrize(
    "first, kinds",
    [(1, ["full_attention", "sliding_attention"]), (0, ["sliding_attention"] * 2)],
)
def test_qwen2_window_from_max_window_layers_reads_back_in_hf(first, kinds, tmp_path):
    """A Qwen2 config without layer_types (older checkpoints): the window from layer
    max_window_layers on, 0 for every layer, as HF derives its layer_types from it."""
    case = CASES["qwen2-sliding"]
    hf = hf_model(case)
    raw = config_json(case, hf) | {"max_window_layers": first}
    del raw["layer_types"]
    config = llama.LlamaConfig.from_dict(raw)
    weights = llama.sanitize(dict(hf.state_dict()), config)
    net = build(llama.Llama, config, weights, torch.float32, torch.device("cpu"), tmp_path)
    save_pretrained(net, tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).layer_types == kinds
    assert_hf_matches(net, tmp_path)
    assert load_model(tmp_path)[0].config == config


def test_mistral_without_a_window_stays_without(tmp_path):
    """Mistral's null window is written as null: absent, both readers would take 4096."""
    case = CASES["mistral"]
    net = ours(case, hf_model(case, **case.off))
    assert net.config.sliding_window is None
    save_pretrained(net, tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).sliding_window is None
    assert load_model(tmp_path)[0].config.sliding_window is None


def test_dtype_is_the_files_own(tmp_path):
    """dtype=bfloat16: the file holds the weights rounded to bfloat16, and config.json says so."""
    case = CASES["llama"]
    net = ours(case, hf_model(case))
    save_pretrained(net, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert_same_state(load_model(tmp_path, torch.bfloat16)[0], net.to(torch.bfloat16))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_real_gguf_saved_loads_in_hf_with_our_logits(model, tmp_path):
    """The real GGUF's blocks dequantized to float32, saved, read by HF: the same logits."""
    lm = tinyformers.load("smollm2" if model == "smollm2" else gemma3_gguf(), fast=False)
    save_pretrained(lm.net, tmp_path)
    ids = torch.tensor([lm.tokenizer.encode("The capital of France is")])
    with torch.inference_mode():
        expected = lm.net(ids)
        error = (hf_reload(tmp_path)(ids).logits - expected).abs().max()
    # our written-out math vs HF eager on the same float32 weights, fp32: 1e-4 (measured 0)
    assert error <= 1e-4, error
    if model == "smollm2":  # our loader too (cheap for the 135M model)
        assert_same_state(load_model(tmp_path)[0], lm.net)


def test_a_failed_save_leaves_the_old_file_whole(tmp_path):
    """A second save that cannot finish (write() fails with EFBIG past RLIMIT_FSIZE, as on a
    full disk): the first save's file stays as it was, and no temporary file is left."""
    case = CASES["gpt2"]
    net = ours(case, hf_model(case))
    save_pretrained(net, tmp_path)
    weights = tmp_path / "model.safetensors"
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    limit = weights.stat().st_size // 2
    script = (
        "from tinyformers.loading.export import save_pretrained\n"
        "from tinyformers.loading.loader import load_model\n"
        f"net, folder = load_model({str(tmp_path)!r})\n"
        "net.wte.weight.add_(1.0)  # other weights, the same size\n"
        "save_pretrained(net, folder)\n"
    )

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run = subprocess.run(
        [sys.executable, "-c", script],
        preexec_fn=limit_file_size,
        capture_output=True,
        text=True,
        timeout=120,
    )
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode != 0 and "could not save the model" in last, run.stderr[-2000:]
    assert "File too large" in last  # EFBIG: the limit was hit, not some other failure
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file
    assert_same_state(load_model(tmp_path)[0], net)  # the old weights


def test_a_packed_model_is_refused_with_one_line(tmp_path):
    case = CASES["llama"]
    net = pack_model(ours(case, hf_model(case)), "f32")  # what load(fast=True) does
    with pytest.raises(TinyformersError, match="load it with fast=False") as error:
        save_pretrained(net, tmp_path)
    assert "\n" not in str(error.value)
    assert not any(tmp_path.iterdir())  # nothing written


def test_our_safetensors_writer_reads_back_in_the_reference_reader(tmp_path):
    from safetensors import safe_open

    from tinyformers.loading.safetensors import save_safetensors

    block = torch.arange(12, dtype=torch.float32)
    tensors = {
        "a": block[:6].view(2, 3),  # two views of one block: the package itself refuses these
        "b": block[6:],
        "half": torch.randn(3, 5).to(torch.bfloat16),
        "t": torch.randn(4, 2).t(),  # not contiguous
        "flags": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
    }
    save_safetensors(tmp_path / "x.safetensors", tensors, metadata={"format": "pt"})
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:  # the reference reader
        assert f.metadata() == {"format": "pt"}
        for name, expected in tensors.items():
            assert torch.equal(f.get_tensor(name), expected), name
