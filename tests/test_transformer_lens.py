"""Named activations against TransformerLens 3.9.0's HookedTransformer (the reference for the
names and for the values), on GPT-2-124M-shaped random weights and a small Llama-shaped model.

TransformerLens changes the weights by default (folds layer norms, centres the writing
weights and the unembedding, folds value biases): every processing step is turned off, so
both libraries compute the checkpoint as it is. 4.x removed HookedTransformer: the test extra
pins 3.9.0 (`pip install transformer-lens==3.9.0`); without it this module is skipped.
"""

from __future__ import annotations

import pytest
import torch
from conftest import hf_gpt2, save_checkpoint
from test_llama import hf_llama

import tinyformers

tl = pytest.importorskip("transformer_lens", reason="needs transformer-lens==3.9.0")
from transformer_lens.pretrained.weight_conversions import (  # noqa: E402
    convert_gpt2_weights,
    convert_llama_weights,
)

NO_PROCESSING = dict(
    fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
)


def hooked(hf_model, convert, **cfg) -> tl.HookedTransformer:
    config = tl.HookedTransformerConfig(device="cpu", dtype=torch.float32, **cfg)
    model = tl.HookedTransformer(config)
    model.load_and_process_state_dict(convert(hf_model, config), **NO_PROCESSING)
    return model.eval()


def compare(ours: tinyformers.LanguageModel, theirs: tl.HookedTransformer, ids: torch.Tensor):
    logits, cache = ours.run_with_cache(ids)
    with torch.no_grad():
        their_logits, their_cache = theirs.run_with_cache(ids)
    shared = [name for name in cache if name in their_cache.cache_dict]
    assert len(shared) >= 0.9 * len(cache), sorted(set(cache) - set(their_cache.cache_dict))
    worst = {}
    for name in shared:
        a, b = cache[name], their_cache[name]
        assert a.shape == b.shape, name
        finite = torch.isfinite(b)  # masked scores are -inf on both sides
        assert torch.equal(torch.isfinite(a), finite), name
        worst[name] = (a[finite] - b[finite]).abs().max().item()
    worst["logits"] = (logits - their_logits).abs().max().item()
    return worst


def test_gpt2_124m_shape_matches_hooked_transformer(tmp_path):
    hf = hf_gpt2()  # 12 layers, 768 wide, the real vocab: GPT-2-124M's shape
    ours = tinyformers.load(save_checkpoint(hf, tmp_path))
    c = hf.config
    theirs = hooked(
        hf,
        convert_gpt2_weights,
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
    ids = torch.randint(0, c.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    worst = compare(ours, theirs, ids)
    # fp32, summed in other orders (our kernels, their einsums): 1e-5 on every value.
    assert max(worst.values()) < 1e-5, {k: v for k, v in worst.items() if v >= 1e-5}


def test_small_llama_matches_hooked_transformer(tmp_path):
    hf = hf_llama()  # SmolLM2's widths (9 query heads sharing 3 key/value heads), 2 layers
    hf.save_pretrained(tmp_path)
    ours = tinyformers.load(tmp_path)
    c = hf.config
    theirs = hooked(
        hf,
        convert_llama_weights,
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
    ids = torch.randint(0, c.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    worst = compare(ours, theirs, ids)
    assert max(worst.values()) < 1e-5, {k: v for k, v in worst.items() if v >= 1e-5}
