"""Models from GGUF files: GPT-2 written the way llama.cpp's converter writes it, against HF."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import GPT2_DATA, hf_gpt2, hf_logits, left_padded_batch

import tinyformers
from tinyformers.errors import CheckpointError
from tinyformers.loading import gguf as gguf_module

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GGUF_NAMES = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}


def write_gpt2_gguf(model, path, context_length=None, f16=False):
    """A GPT-2 GGUF as llama.cpp's convert_hf_to_gguf.py lays it out, with GPT-2's real vocab."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_context_length(context_length or c.n_positions)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(4 * c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_head_count(c.n_head)
    w.add_layer_norm_eps(c.layer_norm_epsilon)
    vocab = json.loads((GPT2_DATA / "vocab.json").read_text(encoding="utf-8"))
    tokens = sorted(vocab, key=vocab.get)
    merges = (GPT2_DATA / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_token_merges([m for m in merges if m])
    w.add_bos_token_id(50256)
    w.add_eos_token_id(50256)
    for name, t in model.state_dict().items():
        name = name.removeprefix("transformer.")
        if name == "lm_head.weight":
            continue  # tied: llama.cpp falls back to token_embd
        if name.endswith(CONV1D):
            t = t.t()  # the converter stores (out, in)
        parts = name.split(".")
        if parts[0] == "h":
            stem = ".".join(parts[2:-1])
            name = f"blk.{parts[1]}.{GGUF_NAMES[stem]}.{parts[-1]}"
        else:
            name = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm"}[
                parts[0]
            ] + f".{parts[-1]}"
        data = t.contiguous().numpy()
        w.add_tensor(name, data.astype(np.float16) if f16 and data.ndim == 2 else data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def reference():
    return hf_gpt2(n_layer=2, seed=9)


def test_gpt2_gguf_matches_hf(tmp_path, reference):
    path = write_gpt2_gguf(reference, tmp_path / "gpt2.gguf")
    model = tinyformers.load(path)
    ids, mask = left_padded_batch([4, 10, 7], 50257)
    real = mask.bool()
    assert (model(ids, mask)[real] - hf_logits(reference, ids, mask)[real]).abs().max() <= 1e-4
    # The tokenizer comes from the same file and encodes like GPT-2's.
    assert model.tokenizer.encode("Hello world") == [15496, 995]
    assert model.eos_ids == {50256}


def test_f16_gguf_equals_hf_on_f16_rounded_weights(tmp_path, reference):
    path = write_gpt2_gguf(reference, tmp_path / "gpt2-f16.gguf", f16=True)
    rounded = hf_gpt2(n_layer=2, seed=9)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    ids, mask = left_padded_batch([5, 8], 50257)
    real = mask.bool()
    ours = tinyformers.load(path)(ids, mask)
    assert (ours[real] - hf_logits(rounded, ids, mask)[real]).abs().max() <= 1e-4  # fp32 math


def test_tensor_shape_the_architecture_does_not_expect(tmp_path, reference, monkeypatch):
    path = write_gpt2_gguf(reference, tmp_path / "bad.gguf", context_length=512)

    def no_weights(*args, **kwargs):
        raise AssertionError("a weight was decoded before the shapes were checked")

    monkeypatch.setattr(gguf_module.GGUFFile, "tensor", no_weights)
    with pytest.raises(
        CheckpointError,
        match=r"bad.gguf: tensor position_embd.weight has shape \(1024, 768\), "
        r"expected \(512, 768\) for this gpt2 config",
    ):
        tinyformers.load(path)


def test_unknown_architecture_in_gguf(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "bert")
    w.add_block_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"x.gguf: GGUF architecture 'bert' is not supported"):
        tinyformers.load(tmp_path / "x.gguf")
