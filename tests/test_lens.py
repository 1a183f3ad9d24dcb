"""Named activations, hooks and the logit lens: each value is what the math of the layer says,
a hook that edits one moves the logits as a recomputation by hand says, and every load path
(HF folder, GGUF, quantized) exposes the values of the model that generates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import smollm2_gguf
from test_models import VOCAB, random_model
from test_readme import with_checks

import tinyformers
from tinyformers import lens
from tinyformers.lm import LanguageModel
from tinyformers.models import set_fast_path

EVERY_LAYER = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out")
ATTENTION = ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z")


def small(arch_name: str) -> torch.nn.Module:
    net = random_model(arch_name)
    set_fast_path(net, True)  # as loaded: hooks must switch the written-out math on themselves
    return net


def cache_of(net, ids, names=None) -> tuple[torch.Tensor, lens.ActivationCache]:
    """run_with_cache on a bare network: the cache keeps a LanguageModel (no tokenizer)."""
    return lens.run_with_cache(LanguageModel(net, None, Path("random"), set()), ids, None, names)


def attention_of(net, layer: int):
    return net.h[layer].attn if hasattr(net, "h") else net.layers[layer].self_attn


@pytest.mark.parametrize("arch_name", ["gpt2", "llama"])
def test_cache_holds_every_named_value_with_transformer_lens_shapes(arch_name):
    net = small(arch_name)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    logits, cache = cache_of(net, ids)
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
    assert cache["pattern", 1] is cache["blocks.1.attn.hook_pattern"] is cache["pattern", -1]
    assert cache["embed"] is cache["hook_embed"]  # TransformerLens's short names
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
    _, cache = cache_of(net, ids, names=["blocks.0.attn.hook_pattern"])
    assert list(cache) == ["blocks.0.attn.hook_pattern"]
    with pytest.raises(ValueError, match="no activation named 'blocks.0.attn.hook_patern'"):
        cache_of(net, ids, names=["blocks.0.attn.hook_patern"])
    with pytest.raises(ValueError, match="no activation named 'blocks.9.hook_resid_pre'"):
        lens.run_with_hooks(net, ids, None, [("blocks.9.hook_resid_pre", lambda x, _: x)])
    assert net.hooks.fn is None  # nothing left listening after an error
    # TransformerLens's filters: a function of the name; one that selects nothing is a typo
    _, cache = cache_of(net, ids, names=lambda name: name.endswith("hook_pattern"))
    assert list(cache) == ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
    with pytest.raises(ValueError, match="no activation selected by <function"):
        cache_of(net, ids, names=lambda name: name.endswith("hook_patern"))


def test_hook_name_is_the_name_and_reads_as_transformer_lens_hook_point():
    hook = lens.HookName("blocks.3.attn.hook_z")
    assert hook == "blocks.3.attn.hook_z" and hook.name == "blocks.3.attn.hook_z"
    assert hook.startswith("blocks.3") and hook.layer() == 3
    with pytest.raises(ValueError, match="hook_embed is not inside a block"):
        lens.HookName("hook_embed").layer()


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
    clean, cache = cache_of(net, ids)
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
    logits, cache = cache_of(net, ids)
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


ARCHITECTURES = ["gpt2", "llama", "gemma3_text"]


def norms_of(block) -> tuple:
    """(the norm before attention, the norm before the MLP) of a block."""
    if hasattr(block, "ln_1"):
        return block.ln_1, block.ln_2
    second = getattr(block, "pre_feedforward_layernorm", block.post_attention_layernorm)
    return block.input_layernorm, second


@pytest.mark.parametrize("arch_name", ARCHITECTURES)
def test_weight_aliases_recompute_the_cached_values(arch_name):
    """TransformerLens's equations on our aliases give what the model computed: q = ln1(x) @
    W_Q + b_Q (each kv head of W_K repeated for its group), attn_out = sum_h z_h @ W_O[h] + b_O,
    the MLP's pre-activations, the embeddings and the logits."""
    net = small(arch_name)
    model = LanguageModel(net, None, Path("random"), set())
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    logits, cache = model.run_with_cache(ids)
    W_Q, W_K, W_V, W_O = (
        model.W_Q,
        model.W_K,
        model.W_V,
        model.W_O,
    )  # [L, nh, C, hs], [L, nh, hs, C]
    group = W_Q.shape[1] // cache["k", 0].shape[2]  # query heads per key/value head
    close = dict(rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        for layer, block in enumerate(lens.blocks(net)):
            ln1, ln2 = norms_of(block)
            x = ln1(cache["resid_pre", layer])  # (B, T, C)
            for short, W, b in (
                ("q", W_Q, model.b_Q),
                ("k", W_K, model.b_K),
                ("v", W_V, model.b_V),
            ):
                heads = torch.einsum("btc,hcd->bthd", x, W[layer]) + b[layer]  # (B, T, nh, hs)
                if short != "q":
                    heads = heads[:, :, ::group]  # the repeated copies of each kv head: one each
                torch.testing.assert_close(heads, cache[short, layer], **close)
            written = (
                torch.einsum("bthd,hdc->btc", cache["z", layer], W_O[layer]) + model.b_O[layer]
            )
            if arch_name == "gemma3_text":  # its post-attention norm follows W_O
                written = block.post_attention_layernorm(written)
            torch.testing.assert_close(written, cache["attn_out", layer], **close)
            x = ln2(cache["resid_mid", layer])
            first = model.W_in if model.W_gate is None else model.W_gate  # hook_pre: the gate's
            pre = x @ first[layer] + (model.b_in[layer] if model.W_gate is None else 0)
            torch.testing.assert_close(pre, cache["pre", layer], **close)
            written = cache["post", layer] @ model.W_out[layer] + model.b_out[layer]
            if arch_name == "gemma3_text":
                written = block.post_feedforward_layernorm(written)
            torch.testing.assert_close(written, cache["mlp_out", layer], **close)
        final = lens.final_norm(net)(cache["resid_post", -1])
        torch.testing.assert_close(final @ model.W_U + model.b_U, logits, **close)
    torch.testing.assert_close(model.W_E[ids], cache["hook_embed"], rtol=0, atol=0)
    if arch_name == "gpt2":
        torch.testing.assert_close(model.W_pos[:6].expand(2, 6, -1), cache["hook_pos_embed"])
    else:
        assert model.W_in.shape == model.W_gate.shape == (2, 64, 96)


@pytest.mark.parametrize("arch_name", ARCHITECTURES)
def test_decompositions_add_up_and_logit_attrs_give_the_logit(arch_name):
    """The stream is the sum of what wrote into it (decompose_resid; the heads and the rest);
    direct logit attribution of those parts adds up to the logit, less the final norm's bias
    term (GPT-2); the final stack through the norm and W_U is the logit lens."""
    net = small(arch_name)
    model = LanguageModel(net, None, Path("random"), set())
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    logits, cache = model.run_with_cache(ids)
    final = cache["resid_post", -1]
    parts = cache.decompose_resid()
    torch.testing.assert_close(parts.sum(0), final, rtol=0, atol=1e-5)
    heads, labels = cache.stack_head_results(incl_remainder=True, return_labels=True)
    assert labels[:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"] and labels[-1] == "remainder"
    torch.testing.assert_close(heads.sum(0), final, rtol=0, atol=1e-5)
    if arch_name != "gemma3_text":  # Gemma 3 normalizes the heads' sum: lens.py says why
        layer_0 = heads[:4].sum(0) + model.b_O[0]
        torch.testing.assert_close(layer_0, cache["attn_out", 0], rtol=0, atol=1e-5)
    tokens = ids.roll(-1, dims=1)  # each position's "next token"
    attrs = cache.logit_attrs(parts, tokens)  # (components, B, T)
    bias = net.ln_f.bias @ model.W_U if arch_name == "gpt2" else torch.zeros(VOCAB)
    expected = logits.gather(-1, tokens[..., None])[..., 0] - bias[tokens]
    torch.testing.assert_close(attrs.sum(0), expected, rtol=1e-5, atol=1e-4)
    wrong = (tokens + 1) % VOCAB
    difference = cache.logit_attrs(parts, tokens, wrong).sum(0)
    torch.testing.assert_close(difference, attrs.sum(0) - cache.logit_attrs(parts, wrong).sum(0))
    lens_logits = cache.accumulated_resid(apply_ln=True)[:, :1] @ model.W_U  # (L + 1, 1, T, V)
    torch.testing.assert_close(lens_logits[:, 0], lens.logit_lens(net, ids[:1]), **CLOSE)


CLOSE = dict(rtol=1e-5, atol=1e-5)


def test_printing_a_cache_or_a_model_is_a_short_summary():
    net = small("llama")
    model = LanguageModel(net, None, Path("random"), set())
    _, cache = model.run_with_cache(torch.zeros(2, 6, dtype=torch.long))
    text = repr(cache)
    assert text.startswith("ActivationCache of Llama: 36 activations, * = blocks 0..1\n")
    assert "\n  blocks.*.attn.hook_pattern [2, 4, 6, 6]\n" in text
    assert len(text.splitlines()) == 1 + 2 + 17  # the title, 2 outside blocks, 17 in each
    tree = repr(model)
    assert tree.splitlines()[0].startswith("LanguageModel(Llama, 0M params, matrices float32")
    assert "(layers): ModuleList(\n    (0-1): 2 x Block(" in tree  # PyTorch's own repr of net


@pytest.fixture(scope="module")
def gpt2_with_bos(gpt2_small_dir, tmp_path_factory) -> tinyformers.LanguageModel:
    """The small GPT-2 with a tokenizer_config.json that asks for BOS first, as Gemma's does."""
    folder = tmp_path_factory.mktemp("gpt2-bos")
    for f in gpt2_small_dir.iterdir():
        (folder / f.name).symlink_to(f)
    config = '{"add_bos_token": true, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}'
    (folder / "tokenizer_config.json").write_text(config)
    return tinyformers.load(folder, fast=False)


def test_to_tokens_and_to_str_tokens_start_with_bos_where_prompts_do(gpt2_with_bos):
    model = gpt2_with_bos
    assert model.to_tokens("Hello world").tolist() == [[50256, 15496, 995]]
    assert model.to_str_tokens("Hello world") == ["<|endoftext|>", "Hello", " world"]
    assert model.to_str_tokens(torch.tensor([[15496, 995]])) == ["Hello", " world"]  # as given
    assert model.to_str_tokens(["Hi", "Hello world"]) == [
        ["<|endoftext|>", "Hi"],
        ["<|endoftext|>", "Hello", " world"],
    ]
    padded = model.to_tokens(["Hi", "Hello world"])  # left, with EOS (no pad token here)
    assert padded.tolist() == [[50256, 50256, 17250], [50256, 15496, 995]]
    assert model.to_single_token(" world") == 995
    with pytest.raises(ValueError, match="' Paris is' is 2 tokens, not one"):
        model.to_single_token(" Paris is")
    with pytest.raises(ValueError, match="one sequence, not ids of shape \\[2, 3\\]"):
        model.to_str_tokens(padded)
    with pytest.raises(ValueError, match="makes its own attention_mask"):
        model.run_with_cache(["Hi", "Hello"], attention_mask=torch.ones(2, 3))


def test_a_list_of_prompts_runs_each_as_if_alone_and_text_tokens_work_in_logit_attrs(
    gpt2_with_bos,
):
    model = gpt2_with_bos
    prompts = ["The capital of France is", "Hi"]
    logits, cache = model.run_with_cache(prompts)
    alone, alone_cache = model.run_with_cache("Hi")
    torch.testing.assert_close(logits[1, -2:], alone[0], **CLOSE)
    torch.testing.assert_close(cache["z", 1][1, -2:], alone_cache["z", 1][0], **CLOSE)
    hooked = model.run_with_hooks(prompts, [("blocks.0.hook_resid_pre", lambda x, hook: None)])
    torch.testing.assert_close(hooked, logits, rtol=0, atol=0)
    parts = cache.decompose_resid(pos_slice=-1)
    by_text = cache.logit_attrs(parts, " Paris", " London", pos_slice=-1)
    paris, london = model.to_single_token(" Paris"), model.to_single_token(" London")
    by_id = cache.logit_attrs(parts, torch.tensor([paris] * 2), torch.tensor([london] * 2), -1)
    torch.testing.assert_close(by_text, by_id, rtol=0, atol=0)


def test_weight_aliases_of_quantized_packed_matrices_are_the_dequantized_weights(
    gpt2_small_dir,
):
    """int8 (a scale per 32 weights) read back from the kernels' layout: within one int8
    step of the checkpoint's weights, in TransformerLens's shapes."""
    plain = tinyformers.load(gpt2_small_dir, fast=False)
    packed = tinyformers.load(gpt2_small_dir, quantize="int8")
    for name in ("W_E", "W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_U", "b_Q", "b_O"):
        expected, got = getattr(plain, name), getattr(packed, name)
        assert got.shape == expected.shape, name
        step = expected.abs().max() / 127  # the largest int8 step of any group
        assert (got - expected).abs().max() <= step, name


@pytest.mark.slow
def test_docs_lens_md_examples_run_as_one_session_with_the_numbers_they_state():
    """docs/lens.md's blocks in order, as a reader types them, on SmolLM2; a comment that is a
    list of ints is checked (README's rule), and so are the numbers its prose builds on."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "lens.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    session: dict = {}
    exec(compile("\n".join(with_checks(code) for code in blocks), "docs/lens.md", "exec"), session)
    assert session["model"].to_str_tokens(session["prompt"])[3] == " France"
    assert [session["head_labels"][i] for i in session["attrs"][:, 0].topk(3).indices] == [
        "L23H4",
        "L29H1",
        "L23H0",
    ]
    logits, parts = session["model"].run_with_cache(session["prompt"])[0], session["parts"]
    difference = logits[0, -1, session["paris"]] - logits[0, -1, session["london"]]
    by_parts = session["cache"].logit_attrs(parts, " Paris", " London", pos_slice=-1).sum()
    torch.testing.assert_close(by_parts, difference, rtol=0, atol=1e-4)
    final = session["lens"][-1, session["paris"]]  # the logit lens's last row: the logits
    torch.testing.assert_close(final, logits[0, -1, session["paris"]], rtol=0, atol=1e-4)
