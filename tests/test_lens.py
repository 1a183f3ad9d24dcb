"""Named activations, hooks and the logit lens: each value is what the math of the layer says,
a hook that edits one moves the logits as a recomputation by hand says, and every load path
(HF folder, GGUF, quantized) exposes the values of the model that generates."""

from __future__ import annotations

import pytest
import torch
from conftest import smollm2_gguf
from test_models import VOCAB, random_model

import tinyformers
from tinyformers import lens
from tinyformers.models import set_fast_path

EVERY_LAYER = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out")
ATTENTION = ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z")


def small(arch_name: str) -> torch.nn.Module:
    net = random_model(arch_name)
    set_fast_path(net, True)  # as loaded: hooks must switch the written-out math on themselves
    return net


def attention_of(net, layer: int):
    return net.h[layer].attn if hasattr(net, "h") else net.layers[layer].self_attn


@pytest.mark.parametrize("arch_name", ["gpt2", "llama"])
def test_cache_holds_every_named_value_with_transformer_lens_shapes(arch_name):
    net = small(arch_name)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    logits, cache = lens.run_with_cache(net, ids)
    names = {"hook_embed", "ln_final.hook_normalized", "blocks.1.hook_resid_post"}
    names |= {f"blocks.{i}.{n}" for i in range(2) for n in EVERY_LAYER}
    names |= {f"blocks.{i}.attn.{n}" for i in range(2) for n in ATTENTION}
    names |= {f"blocks.{i}.mlp.hook_{n}" for i in range(2) for n in ("pre", "post")}
    names |= {"hook_pos_embed"} if arch_name == "gpt2" else {"blocks.0.attn.hook_rot_q"}
    assert names <= set(cache) and list(cache) == lens.hook_names(net)
    attn = attention_of(net, 0)
    n_kv = getattr(attn, "n_kv_head", attn.n_head)
    assert cache["q", 0].shape == (2, 6, attn.n_head, 16)  # [batch, pos, head, d_head]
    assert cache["k", 0].shape == (2, 6, n_kv, 16)  # GQA: the 2 key/value heads themselves
    assert cache["pattern", 1].shape == (2, attn.n_head, 6, 6)  # [batch, head, query, key]
    assert cache["pattern", 1] is cache["blocks.1.attn.hook_pattern"]
    # The values are the equations': scaled scores masked to -inf above the diagonal, softmax
    # rows, z = pattern @ v with each key/value head repeated for its group of query heads.
    scores, pattern = cache["attn_scores", 0], cache["pattern", 0]
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)
    assert torch.isneginf(scores[..., future]).all() and torch.isfinite(scores[..., ~future]).all()
    torch.testing.assert_close(pattern, torch.softmax(scores, -1), rtol=0, atol=0)
    v = cache["v", 0].repeat_interleave(attn.n_head // n_kv, dim=2)  # [B, T, nh, hs]
    z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
    torch.testing.assert_close(cache["z", 0], z, rtol=1e-5, atol=1e-6)
    rotated = "rot_" if arch_name == "llama" else ""  # Llama's scores read the rotated q, k
    q, k = cache[rotated + "q", 0], cache[rotated + "k", 0]
    k = k.repeat_interleave(attn.n_head // n_kv, dim=2)
    expected = torch.einsum("bqhd,bkhd->bhqk", q, k) * attn.scale
    torch.testing.assert_close(scores[..., ~future], expected[..., ~future], rtol=1e-5, atol=1e-5)
    # The stream adds up: resid_mid = resid_pre + attn_out, and the logits read the last one.
    torch.testing.assert_close(
        cache["resid_mid", 1], cache["resid_pre", 1] + cache["attn_out", 1], rtol=0, atol=0
    )
    # (outside run_with_cache the norm takes its fused kernel: float rounding apart, 1e-5)
    torch.testing.assert_close(net.unembed(cache["resid_post", 1]), logits, rtol=0, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(net(ids), logits, rtol=0, atol=1e-5)  # fast path: same


def test_names_filter_and_unknown_names():
    net = small("gpt2")
    ids = torch.tensor([[1, 2, 3]])
    _, cache = lens.run_with_cache(net, ids, names=["blocks.0.attn.hook_pattern"])
    assert list(cache) == ["blocks.0.attn.hook_pattern"]
    with pytest.raises(ValueError, match="no activation named 'blocks.0.attn.hook_patern'"):
        lens.run_with_cache(net, ids, names=["blocks.0.attn.hook_patern"])
    with pytest.raises(ValueError, match="no activation named 'blocks.9.hook_resid_pre'"):
        lens.run_with_hooks(net, ids, None, [("blocks.9.hook_resid_pre", lambda x, _: x)])
    assert net.hooks.fn is None  # nothing left listening after an error


@pytest.mark.parametrize("arch_name", ["gpt2", "llama"])
def test_zeroing_one_heads_z_moves_the_logits_as_recomputed_by_hand(arch_name):
    """Ablate head 2 of the last block; by hand: that head's share of the output projection
    leaves the residual, then the last MLP and the unembedding run on what is left."""
    net, head, last = small(arch_name), 2, 1
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))

    def ablate(z, name):
        assert name == f"blocks.{last}.attn.hook_z"
        return z.index_fill(2, torch.tensor([head]), 0.0)  # [B, T, head, d_head]

    ablated = lens.run_with_hooks(net, ids, None, [(f"blocks.{last}.attn.hook_z", ablate)])
    clean, cache = lens.run_with_cache(net, ids)
    attn = attention_of(net, last)
    out_proj = attn.c_proj if arch_name == "gpt2" else attn.o_proj
    hs = cache["z", last].shape[-1]
    w_head = out_proj.weight[:, head * hs : (head + 1) * hs]  # [C, hs]: what head 2 writes
    resid_mid = cache["resid_mid", last] - cache["z", last][:, :, head] @ w_head.T
    block = net.h[last] if arch_name == "gpt2" else net.layers[last]
    ln_2 = block.ln_2 if arch_name == "gpt2" else block.post_attention_layernorm
    with torch.inference_mode():
        by_hand = net.unembed(resid_mid + block.mlp(ln_2(resid_mid)))
    assert (ablated - clean).abs().max() > 1e-2  # the head matters
    torch.testing.assert_close(ablated, by_hand, rtol=1e-5, atol=1e-5)


def test_a_hook_returning_none_leaves_the_value():
    net = small("llama")
    ids = torch.tensor([[5, 6, 7]])
    seen = []
    logits = lens.run_with_hooks(
        net, ids, None, [("blocks.0.hook_resid_pre", lambda x, name: seen.append(name))]
    )
    with torch.inference_mode():  # the written-out path while listening, SDPA without
        torch.testing.assert_close(logits, net(ids), rtol=0, atol=1e-5)
    assert seen == ["blocks.0.hook_resid_pre"]


@pytest.mark.parametrize("arch_name", ["gpt2", "llama"])
def test_logit_lens_recomputes_the_final_norm_at_every_layer(arch_name):
    net = small(arch_name)
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    logits, cache = lens.run_with_cache(net, ids)
    table = lens.logit_lens(net, ids)
    assert table.shape == (3, 5, VOCAB)
    torch.testing.assert_close(table[-1], logits[0], rtol=0, atol=1e-5)
    norm = net.ln_f if arch_name == "gpt2" else net.norm
    w_u = net.lm_head.weight
    final = cache["resid_post", 1][0]
    for layer in range(2):
        resid = cache["resid_pre", layer][0]  # (T, C)
        if arch_name == "gpt2":
            centred = resid - resid.mean(-1, keepdim=True)
            scale = centred.pow(2).mean(-1, keepdim=True).add(norm.eps).sqrt()
            stale = final - final.mean(-1, keepdim=True)
            stale = stale.pow(2).mean(-1, keepdim=True).add(norm.eps).sqrt()
            by_hand = (centred / scale * norm.weight + norm.bias) @ w_u.T
            wrong = (centred / stale * norm.weight + norm.bias) @ w_u.T  # TL #1076
        else:
            rms = resid.pow(2).mean(-1, keepdim=True).add(norm.eps).sqrt()
            stale = final.pow(2).mean(-1, keepdim=True).add(norm.eps).sqrt()
            by_hand = (resid / rms * norm.weight) @ w_u.T
            wrong = (resid / stale * norm.weight) @ w_u.T  # TL #1076: the last layer's scale
        torch.testing.assert_close(table[layer], by_hand, rtol=1e-5, atol=1e-5)
        assert (table[layer] - wrong).abs().max() > 1e-2  # the test tells the two apart


@pytest.mark.slow
def test_every_load_path_exposes_the_values_of_the_model_that_generates(gpt2_small_dir):
    """HF folder (packed float32 and bfloat16, or plain), the GGUF file dequantized, and its
    own Q4/Q8 blocks: the cache holds the values of the loaded weights and kernels."""
    for source, options in [
        (gpt2_small_dir, {}),
        (gpt2_small_dir, {"dtype": "bfloat16"}),
        (smollm2_gguf(), {}),
        (smollm2_gguf(), {"quantize": "gguf"}),  # int8's packing is the same code path
    ]:
        model = tinyformers.load(source, **options)
        ids = torch.tensor([model.tokenizer.encode("The capital of France is")])
        logits, cache = model.run_with_cache("The capital of France is")
        embed = model.net.wte if hasattr(model.net, "wte") else model.net.embed_tokens
        with torch.inference_mode():
            assert torch.equal(cache["hook_embed"], embed(ids)), (source, options)
            fast = model(ids)
            set_fast_path(model.net, False)  # the kernels stay: only attention is written out
            assert torch.equal(model(ids), logits), (source, options)
        # Against SDPA: float rounding in float32 (1e-4) and bfloat16 (5e-2). Quantized modes
        # round every activation to int8 steps, so a 1e-7 difference in attention can cross a
        # step and grow through 30 layers (0.84 measured on Q4_1): the prediction is the same.
        bound = {"bfloat16": 5e-2}.get(options.get("dtype"), 1e-4)
        if "quantize" not in options:
            assert (fast - logits).abs().max() < bound, (source, options)
        assert fast[0, -1].argmax() == logits[0, -1].argmax()
        top = model.logit_lens("The capital of France is")[-1, -1].argmax()
        assert top == logits[0, -1].argmax()


def test_info_repr_dtype_and_parameter_count_tell_the_truth(gpt2_small_dir, reference_count):
    plain = tinyformers.load(gpt2_small_dir, fast=False)
    assert plain.num_parameters() == reference_count  # HF's num_parameters() of the checkpoint
    for options, dtype, matrices in [
        ({}, torch.float32, "float32 packed for the CPU kernels"),
        ({"dtype": "bfloat16"}, torch.bfloat16, "bfloat16 packed for the CPU kernels"),
        ({"quantize": "int8"}, torch.float32, "int8 (a scale per 32) packed for the CPU kernels"),
        ({"fast": False}, torch.float32, "float32"),
        ({"fast": False, "dtype": "bfloat16"}, torch.bfloat16, "bfloat16"),
    ]:
        model = tinyformers.load(gpt2_small_dir, **options)
        info = model.info()
        assert model.dtype == dtype, options
        assert model.num_parameters() == info["parameters"] == reference_count, options
        assert info["weights: matrices"] == matrices, options
        assert f"{reference_count / 1e6:.0f}M params, matrices {matrices}" in repr(model)
        assert info["attention"] == (
            "written out" if options.get("fast") is False else "fused (SDPA)"
        )
        assert info["context"] == 1024 and info["file"] == str(gpt2_small_dir)


@pytest.fixture(scope="module")
def reference_count(gpt2_small_dir) -> int:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(gpt2_small_dir).num_parameters()
