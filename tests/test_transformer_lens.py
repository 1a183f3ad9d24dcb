"""Named activations and TransformerLens's tools against TransformerLens 3.9.0's
HookedTransformer (the reference for the names, the values, the shapes and the labels), on
GPT-2-shaped random weights with GPT-2's tokenizer, a small Llama-shaped (GQA) model and a tiny
Gemma 3 (a sliding-window layer and a global one).

TransformerLens changes the weights by default (folds layer norms, centres the writing
weights and the unembedding, folds value biases): every processing step is turned off, so
both libraries compute the checkpoint as it is. The one exception is `logit_attrs`, whose
meaning needs the final norm's gain in W_U: it is compared with fold_ln=True, TransformerLens's
default (lens.py says why). 4.x removed HookedTransformer: the test extra pins 3.9.0
(`pip install transformer-lens==3.9.0`); without it this module is skipped.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import hf_gpt2, save_checkpoint
from test_llama import hf_llama
from test_models import CASES, hf_model

import tinyformers

tl = pytest.importorskip("transformer_lens", reason="needs transformer-lens==3.9.0")
from transformer_lens.pretrained.weight_conversions import (  # noqa: E402
    convert_gemma_weights,
    convert_gpt2_weights,
    convert_llama_weights,
)

NO_PROCESSING = dict(
    fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
)
FOLD_LN = {**NO_PROCESSING, "fold_ln": True}  # TransformerLens's default for the final norm
BOUND = 1e-5  # fp32, summed in other orders (our kernels, their einsums)


def hooked(hf_model, convert, processing=NO_PROCESSING, tokenizer=None) -> tl.HookedTransformer:
    config_of = {
        convert_gpt2_weights: gpt2_config,
        convert_llama_weights: llama_config,
        convert_gemma_weights: gemma3_config,
    }
    cfg = config_of[convert](hf_model.config)
    config = tl.HookedTransformerConfig(device="cpu", dtype=torch.float32, **cfg)
    model = tl.HookedTransformer(config, tokenizer=tokenizer)
    model.load_and_process_state_dict(convert(hf_model, config), **processing)
    return model.eval()


def gpt2_config(c) -> dict:
    return dict(
        d_model=c.n_embd,
        d_head=c.n_embd // c.n_head,
        n_heads=c.n_head,
        d_mlp=4 * c.n_embd,
        n_layers=c.n_layer,
        n_ctx=c.n_positions,
        d_vocab=c.vocab_size,
        act_fn="gelu_new",
        normalization_type="LN",
        eps=c.layer_norm_epsilon,
        original_architecture="GPT2LMHeadModel",
    )


def llama_config(c) -> dict:
    return dict(
        d_model=c.hidden_size,
        d_head=c.hidden_size // c.num_attention_heads,
        n_heads=c.num_attention_heads,
        n_key_value_heads=c.num_key_value_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings,
        d_vocab=c.vocab_size,
        act_fn="silu",
        normalization_type="RMS",
        eps=c.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=c.hidden_size // c.num_attention_heads,
        rotary_base=int(c.rope_parameters["rope_theta"]),
        rotary_adjacent_pairs=False,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
    )


def gemma3_config(c) -> dict:
    kinds = {"sliding_attention": "local", "full_attention": "global"}
    rope = c.rope_parameters  # by layer kind
    return dict(
        d_model=c.hidden_size,
        d_head=c.head_dim,
        n_heads=c.num_attention_heads,
        n_key_value_heads=c.num_key_value_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings,
        d_vocab=c.vocab_size,
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        eps=c.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=c.head_dim,
        rotary_base=int(rope["full_attention"]["rope_theta"]),
        rotary_base_local=int(rope["sliding_attention"]["rope_theta"]),
        use_attn_scale=True,  # 1 / sqrt(d_head): query_pre_attn_scalar is d_head here
        use_qk_norm=True,
        use_normalization_before_and_after=True,
        use_local_attn=True,
        window_size=c.sliding_window,
        attn_types=[kinds[kind] for kind in c.layer_types],
        final_rms=True,
        gated_mlp=True,
        original_architecture="Gemma3ForCausalLM",
    )


def compare(ours: tinyformers.LanguageModel, theirs: tl.HookedTransformer, ids: torch.Tensor):
    logits, cache = ours.run_with_cache(ids)
    with torch.no_grad():
        their_logits, their_cache = theirs.run_with_cache(ids)
    shared = [name for name in cache if name in their_cache.cache_dict]
    assert len(shared) >= 0.9 * len(cache), sorted(set(cache) - set(their_cache.cache_dict))
    worst = {}
    for name in shared:
        a, b = cache[name], their_values(name, their_cache, cache[name].shape)
        assert a.shape == b.shape, name
        finite = torch.isfinite(b)  # masked scores are -inf on both sides
        assert torch.equal(torch.isfinite(a), finite), name
        worst[name] = (a[finite] - b[finite]).abs().max().item()
    worst["logits"] = (logits - their_logits).abs().max().item()
    return worst


def their_values(name: str, their_cache, shape) -> torch.Tensor:
    """TransformerLens's value of `name`, its Gemma q/k norms in our [B, T, heads, d_head]."""
    if name.endswith(("q_norm.hook_normalized", "k_norm.hook_normalized")):
        return their_cache[name].view(shape)  # flattened there to [B * T * heads, d_head]
    return their_cache[name]


def largest(differences: dict[str, float]) -> float:
    assert max(differences.values()) < BOUND, {k: v for k, v in differences.items() if v >= BOUND}
    return max(differences.values())


def test_gpt2_124m_shape_matches_hooked_transformer(tmp_path):
    hf = hf_gpt2()  # 12 layers, 768 wide, the real vocab: GPT-2-124M's shape
    ours = tinyformers.load(save_checkpoint(hf, tmp_path))
    theirs = hooked(hf, convert_gpt2_weights)
    ids = torch.randint(
        0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    largest(compare(ours, theirs, ids))


# The tools below, on one model of each kind (2 layers), shared by the tests of this module.


class Pair:
    """Our model (as `load` gives it: packed for the kernels) and TransformerLens's of the
    same weights, as the checkpoint has them and with fold_ln=True; `hf`, their source."""

    def __init__(self, hf, ours, convert, tokenizer=None) -> None:
        self.hf, self.ours, self.convert = hf, ours, convert
        self.theirs = hooked(hf, convert, tokenizer=tokenizer)
        self.folded = hooked(hf, convert, FOLD_LN, tokenizer=tokenizer)
        vocab = hf.config.vocab_size
        self.ids = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Pair:
    from transformers import GPT2TokenizerFast

    hf = hf_gpt2(n_layer=2)
    folder = save_checkpoint(hf, tmp_path_factory.mktemp("gpt2"))  # with GPT-2's tokenizer files
    tokenizer = GPT2TokenizerFast.from_pretrained(folder)  # TransformerLens reloads it by path
    ours = tinyformers.load(folder)
    return Pair(hf, ours, convert_gpt2_weights, tokenizer)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Pair:
    hf = hf_llama()  # SmolLM2's widths (9 query heads sharing 3 key/value heads), 2 layers
    folder = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(folder)
    return Pair(hf, tinyformers.load(folder), convert_llama_weights)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> Pair:
    hf = hf_model(CASES["gemma3_text"])  # a sliding layer (window 3), then a global one; GQA
    folder = tmp_path_factory.mktemp("gemma3")
    hf.save_pretrained(folder)
    return Pair(hf, tinyformers.load(folder), convert_gemma_weights)


@pytest.fixture(params=["gpt2", "llama", "gemma3"])
def pair(request) -> Pair:
    return request.getfixturevalue(request.param)


def test_every_named_value_matches_hooked_transformer(pair):
    largest(compare(pair.ours, pair.theirs, pair.ids))


def test_to_tokens_and_to_str_tokens_match_transformer_lens(gpt2):
    """GPT-2 prompts have no BOS (ours as `generate` reads them): TransformerLens's
    prepend_bos=False; lists left-padded, its padding_side="left" (it pads with EOS too)."""
    ours, theirs = gpt2.ours, gpt2.theirs
    texts = ["The capital of France is", "Hello", " café ☕ 𝕏\n\tend"]  # partial UTF-8 pieces
    for text in texts:
        ids = theirs.to_tokens(text, prepend_bos=False)
        assert torch.equal(ours.to_tokens(text), ids)
        pieces = theirs.to_str_tokens(text, prepend_bos=False)
        assert ours.to_str_tokens(text) == pieces
        assert ours.to_str_tokens(ids) == ours.to_str_tokens(ids[0].tolist()) == pieces
    batch = theirs.to_tokens(texts, prepend_bos=False, padding_side="left")
    assert torch.equal(ours.to_tokens(texts), batch)
    assert ours.to_str_tokens(texts) == theirs.to_str_tokens(texts, prepend_bos=False)
    assert ours.to_single_token(" Paris") == theirs.to_single_token(" Paris")


@pytest.mark.parametrize("fast", [True, False], ids=["packed", "plain"])
def test_weight_aliases_match_transformer_lens(pair, fast, tmp_path):
    """Packed (load's default) matrices are unpacked: the same numbers as the checkpoint's."""
    ours = pair.ours
    if not fast:
        pair.hf.save_pretrained(tmp_path)
        ours = tinyformers.load(tmp_path, fast=False)
    names = ["W_E", "W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_U"]
    names += ["b_Q", "b_K", "b_V", "b_O", "b_in", "b_out", "b_U"]
    names += ["W_pos"] if pair.convert is convert_gpt2_weights else ["W_gate"]
    for name in names:
        mine, theirs = getattr(ours, name), getattr(pair.theirs, name)
        assert mine.shape == theirs.shape, name  # GQA: W_K, W_V, b_K, b_V repeated to n_heads
        assert torch.equal(mine, theirs.detach()), name
    if pair.convert is convert_gpt2_weights:
        assert ours.W_gate is pair.theirs.W_gate is None
    else:
        with pytest.raises(AttributeError, match="W_pos: (Llama|Gemma3) has no learned positions"):
            _ = ours.W_pos


def test_cache_tools_match_transformer_lens(pair):
    """accumulated_resid, decompose_resid, stack_head_results and apply_ln_to_stack over
    their options: values within 1e-5, shapes and labels equal."""
    _, cache = pair.ours.run_with_cache(pair.ids)
    with torch.no_grad():
        _, their_cache = pair.theirs.run_with_cache(pair.ids)
    calls = [
        ("accumulated_resid", dict(return_labels=True)),
        ("accumulated_resid", dict(apply_ln=True, incl_mid=True, return_labels=True)),
        ("accumulated_resid", dict(layer=1, apply_ln=True, mlp_input=True, pos_slice=-1)),
        ("accumulated_resid", dict(layer=1, incl_mid=True, pos_slice=(2, 6), return_labels=True)),
        ("decompose_resid", dict(return_labels=True)),
        ("decompose_resid", dict(apply_ln=True, pos_slice=-1, return_labels=True)),
        ("decompose_resid", dict(layer=1, mlp_input=True, apply_ln=True, return_labels=True)),
        (
            "decompose_resid",
            dict(mode="attn", incl_embeds=False, pos_slice=[0, 4], return_labels=True),
        ),
        ("stack_head_results", dict(return_labels=True)),
        ("stack_head_results", dict(apply_ln=True, incl_remainder=True, pos_slice=-1)),
        ("stack_head_results", dict(layer=1, apply_ln=True, return_labels=True)),
    ]
    differences = {}
    for method, options in calls:
        mine, theirs = getattr(cache, method)(**options), getattr(their_cache, method)(**options)
        if options.get("return_labels"):
            assert mine[1] == theirs[1], (method, options)
            mine, theirs = mine[0], theirs[0]
        assert mine.shape == theirs.shape, (method, options)
        differences[f"{method}({options})"] = (mine - theirs).abs().max().item()
    stack = cache.decompose_resid(pos_slice=-1)
    mine = cache.apply_ln_to_stack(stack, layer=1, mlp_input=True, pos_slice=-1, batch_slice=(1, 3))
    theirs = their_cache.apply_ln_to_stack(
        their_cache.decompose_resid(pos_slice=-1), 1, True, pos_slice=-1, batch_slice=(1, 3)
    )
    differences["apply_ln_to_stack"] = (mine - theirs).abs().max().item()
    largest(differences)


def test_logit_attrs_match_transformer_lens_default_fold_ln(pair):
    """Direct logit attribution of each component and head, to one token per row and to a
    difference of two, against TransformerLens with fold_ln=True (its W_U holds the gain)."""
    _, cache = pair.ours.run_with_cache(pair.ids)
    with torch.no_grad():
        _, their_cache = pair.folded.run_with_cache(pair.ids)
    right, wrong = torch.tensor([11, 22, 33]), torch.tensor([44, 55, 66])
    differences = {}
    for stack_of in ("decompose_resid", "stack_head_results", "accumulated_resid"):
        mine = getattr(cache, stack_of)(pos_slice=-1)
        theirs = getattr(their_cache, stack_of)(pos_slice=-1)
        for incorrect in (None, wrong):
            a = cache.logit_attrs(mine, right, incorrect, pos_slice=-1)
            b = their_cache.logit_attrs(theirs, right, incorrect, pos_slice=-1)
            assert a.shape == b.shape == (len(mine), 3)
            differences[f"{stack_of}, {incorrect}"] = (a - b).abs().max().item()
    every_position = cache.decompose_resid()  # tokens [B, T]: one per position
    tokens = pair.ids.roll(-1, dims=1)
    a = cache.logit_attrs(every_position, tokens)
    b = their_cache.logit_attrs(their_cache.decompose_resid(), tokens)
    differences["[B, T] tokens"] = (a - b).abs().max().item()
    a = cache.logit_attrs(mine, 7, batch_slice=0, pos_slice=-1)  # one int token, one row
    b = their_cache.logit_attrs(theirs, 7, batch_slice=0, pos_slice=-1)
    differences["int token, batch_slice"] = (a - b).abs().max().item()
    largest(differences)


def test_hooks_with_hook_name_fwd_hooks_and_filters_match_transformer_lens(pair):
    """TransformerLens's hook functions run unchanged: `fn(value, hook)` reading hook.name and
    hook.layer(), given with fwd_hooks=, a name or a filter function, partial applied."""

    def ablate_head(z, hook, head):  # z [B, T, nh, hs]
        assert hook.name == f"blocks.{hook.layer()}.attn.hook_z"
        z[:, :, head] = 0.0
        return z

    seen = []
    fwd_hooks = [
        ("blocks.1.attn.hook_z", partial(ablate_head, head=2)),
        (lambda name: name.endswith("hook_pattern"), lambda p, hook: seen.append(hook.name)),
        ("blocks.0.hook_resid_mid", lambda x, hook: x * 0.5),
    ]
    mine = pair.ours.run_with_hooks(pair.ids, fwd_hooks=fwd_hooks)
    ours_seen, seen[:] = list(seen), []
    with torch.no_grad():
        theirs = pair.theirs.run_with_hooks(pair.ids, fwd_hooks=fwd_hooks)
        clean = pair.theirs(pair.ids)
    assert ours_seen == seen == ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
    assert (theirs - clean).abs().max() > 1e-2  # the hooks change the logits
    largest({"run_with_hooks": (mine - theirs).abs().max().item()})
    # our own fn(value, name) keeps working: the name is a str
    same = pair.ours.run_with_hooks(pair.ids, [("blocks.0.hook_resid_mid", lambda x, n: x * 0.5)])
    assert (same - mine).abs().max() > 1e-2


def test_run_with_cache_on_a_list_of_prompts_gives_each_prompt_alone(pair):
    """A list runs left-padded with its mask: each row's real positions hold what
    TransformerLens computes for that prompt alone (texts for GPT-2, id lists for Llama)."""
    lengths = [9, 3, 6]
    prompts = [pair.ids[row, :n].tolist() for row, n in enumerate(lengths)]
    if pair.convert is convert_gpt2_weights:
        prompts = [pair.ours.tokenizer.decode(p) for p in prompts]
        lengths = [len(pair.ours.to_tokens(p)[0]) for p in prompts]
    logits, cache = pair.ours.run_with_cache(prompts)
    T = logits.shape[1]
    assert max(lengths) == T
    differences = {}
    for row, (prompt, n) in enumerate(zip(prompts, lengths, strict=True)):
        ids = pair.ours.to_tokens(prompt) if isinstance(prompt, str) else torch.tensor([prompt])
        with torch.no_grad():
            their_logits, their_cache = pair.theirs.run_with_cache(ids)
        differences[f"{row} logits"] = (logits[row, T - n :] - their_logits[0]).abs().max().item()
        for name, value in cache.items():
            if name not in their_cache.cache_dict:
                continue
            if name.endswith(("hook_pattern", "hook_attn_scores")):  # [B, nh, query, key]
                value = value[row, :, T - n :, T - n :]
            else:  # [B, T, ...]
                value = value[row, T - n :]
            expected = their_values(name, their_cache, (1, *value.shape))[0]
            finite = torch.isfinite(expected)
            assert torch.equal(torch.isfinite(value), finite), name
            differences[f"{row} {name}"] = (value[finite] - expected[finite]).abs().max().item()
    largest(differences)
    hooked_logits = pair.ours.run_with_hooks(prompts, [])  # run_with_hooks pads the same way
    torch.testing.assert_close(hooked_logits, logits, rtol=0, atol=0)
