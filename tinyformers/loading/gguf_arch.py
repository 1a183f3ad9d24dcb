"""What llama.cpp's converters did to each architecture, undone: a GGUF file's metadata keys ->
the model's Hugging Face config dict, its tensor names -> ours, and its layout changes reverted.

The models know no file formats; this table is the one place that knows GGUF's names. An
architecture's entry gives `config` (metadata -> HF config dict), `names` (GGUF tensor name ->
ours, for one config) and `sanitize` (the converter's layout changes undone, on our names).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from tinyformers.loading.gguf import unpermute_qk


@dataclass(frozen=True)
class GGUFArchitecture:
    config: Callable[[dict, int], dict]  # (metadata of this architecture, n_vocab) -> config dict
    names: Callable[[object], dict[str, str]]  # config -> {GGUF tensor name: our name}
    sanitize: Callable[[dict[str, Tensor], object], dict[str, Tensor]] = lambda w, config: w


def expand_names(names: dict[str, str], per_layer: dict[str, str], n_layer: int) -> dict[str, str]:
    """GGUF tensor name -> ours: `names` as given, and each `per_layer` entry for every block,
    weight and bias: ("attn_norm", "h.{i}.ln_1") gives blk.0.attn_norm.weight -> h.0.ln_1.weight.
    """
    out = dict(names)
    for i in range(n_layer):
        for theirs, ours in per_layer.items():
            for kind in ("weight", "bias"):
                out[f"blk.{i}.{theirs}.{kind}"] = f"{ours.format(i=i)}.{kind}"
    return out


# GPT-2 -----------------------------------------------------------------------------------------


def _gpt2_config(m: dict, n_vocab: int) -> dict:
    return {
        "model_type": "gpt2",
        "vocab_size": m.get("vocab_size", n_vocab),
        "n_positions": m.get("context_length"),
        "n_embd": m.get("embedding_length"),
        "n_layer": m.get("block_count"),
        "n_head": m.get("attention.head_count"),
        "n_inner": m.get("feed_forward_length"),
        "layer_norm_epsilon": m.get("attention.layer_norm_epsilon", 1e-5),
    }


def _gpt2_names(config) -> dict[str, str]:
    names = {
        "token_embd.weight": "wte.weight",
        "position_embd.weight": "wpe.weight",
        "output_norm.weight": "ln_f.weight",
        "output_norm.bias": "ln_f.bias",
        "output.weight": "lm_head.weight",
    }
    per_layer = {
        "attn_norm": "h.{i}.ln_1",
        "attn_qkv": "h.{i}.attn.c_attn",  # llama.cpp stores GPT-2's Conv1D weights as (out, in)
        "attn_output": "h.{i}.attn.c_proj",
        "ffn_norm": "h.{i}.ln_2",
        "ffn_up": "h.{i}.mlp.c_fc",
        "ffn_down": "h.{i}.mlp.c_proj",
    }
    return expand_names(names, per_layer, config.n_layer)


# Llama -----------------------------------------------------------------------------------------


def _llama_config(m: dict, n_vocab: int) -> dict:
    n_head = m.get("attention.head_count")
    return {
        "model_type": "llama",
        "vocab_size": m.get("vocab_size", n_vocab),
        "hidden_size": m.get("embedding_length"),
        "intermediate_size": m.get("feed_forward_length"),
        "num_hidden_layers": m.get("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": m.get("attention.head_count_kv", n_head),
        "head_dim": m.get("attention.key_length"),
        "max_position_embeddings": m.get("context_length", 2048),
        "rms_norm_eps": m.get("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": m.get("rope.freq_base", 10000.0),
    }


# Llama-family GGUF names: the whole-model tensors and each block's (Gemma 3 adds norms)
LLAMA_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
LLAMA_PER_LAYER = {
    "attn_norm": "layers.{i}.input_layernorm",
    "attn_q": "layers.{i}.self_attn.q_proj",
    "attn_k": "layers.{i}.self_attn.k_proj",
    "attn_v": "layers.{i}.self_attn.v_proj",
    "attn_output": "layers.{i}.self_attn.o_proj",
    "ffn_norm": "layers.{i}.post_attention_layernorm",
    "ffn_gate": "layers.{i}.mlp.gate_proj",
    "ffn_up": "layers.{i}.mlp.up_proj",
    "ffn_down": "layers.{i}.mlp.down_proj",
}


def _llama_names(config) -> dict[str, str]:
    return expand_names(LLAMA_NAMES, LLAMA_PER_LAYER, config.num_hidden_layers)


def _llama_sanitize(weights: dict[str, Tensor], config) -> dict[str, Tensor]:
    """Undo llama.cpp's q/k row permutation (made for its interleaved rope) to HF's layout."""
    for name, n_head in (
        ("q_proj", config.num_attention_heads),
        ("k_proj", config.num_key_value_heads),
    ):
        for i in range(config.num_hidden_layers):
            key = f"layers.{i}.self_attn.{name}.weight"
            if key in weights:
                weights[key] = unpermute_qk(weights[key], n_head)
    return weights


# Gemma 3 ---------------------------------------------------------------------------------------


def _gemma3_config(m: dict, n_vocab: int) -> dict:
    """subtle: the file holds no layer pattern, no local RoPE base and no attention scale;
    llama.cpp hard-codes them for gemma3 (llama-model.cpp, LLM_ARCH_GEMMA3): every 6th layer
    global (swa pattern 6), base 10000 on the local layers, and scores scaled by
    1/sqrt(head_dim), or 1/sqrt(hidden / heads) for the 27B (62 layers). So do we."""
    n_layer, head_dim = m.get("block_count"), m.get("attention.key_length", 256)
    scalar = head_dim
    if n_layer == 62:  # the 27B
        scalar = m.get("embedding_length") // m.get("attention.head_count")
    config = {
        "model_type": "gemma3_text",
        "vocab_size": m.get("vocab_size", n_vocab),
        "hidden_size": m.get("embedding_length"),
        "intermediate_size": m.get("feed_forward_length"),
        "num_hidden_layers": n_layer,
        "num_attention_heads": m.get("attention.head_count"),
        "num_key_value_heads": m.get("attention.head_count_kv"),
        "head_dim": head_dim,
        "max_position_embeddings": m.get("context_length"),
        "rms_norm_eps": m.get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": m.get("rope.freq_base", 1_000_000.0),  # the global layers'
        "rope_local_base_freq": 10_000.0,
        "sliding_window": m.get("attention.sliding_window"),
        "sliding_window_pattern": 6,
        "query_pre_attn_scalar": scalar,
        "final_logit_softcapping": m.get("final_logit_softcapping"),  # the model refuses one
    }
    if (kind := m.get("rope.scaling.type")) not in (None, "none"):  # linear 8 on 4B and up
        config["rope_scaling"] = {"rope_type": kind, "factor": m.get("rope.scaling.factor")}
    return config


def _gemma3_names(config) -> dict[str, str]:
    """Llama's names, with q/k norms and a norm after attention and after the MLP; the norm
    llama.cpp calls `ffn_norm` is Gemma's pre-feedforward one."""
    per_layer = LLAMA_PER_LAYER | {
        "attn_q_norm": "layers.{i}.self_attn.q_norm",
        "attn_k_norm": "layers.{i}.self_attn.k_norm",
        "post_attention_norm": "layers.{i}.post_attention_layernorm",
        "ffn_norm": "layers.{i}.pre_feedforward_layernorm",
        "post_ffw_norm": "layers.{i}.post_feedforward_layernorm",
    }
    return expand_names(LLAMA_NAMES, per_layer, config.num_hidden_layers)


def _gemma3_sanitize(weights: dict[str, Tensor], config) -> dict[str, Tensor]:
    """Undo the converter's one change: it stores every norm's gain as 1 + weight (what
    Gemma3RMSNorm multiplies by); the model adds the 1 itself. q and k are not permuted: only
    llama.cpp's Llama converters do that, not its Gemma ones."""
    for name, w in weights.items():
        if name.endswith("norm.weight"):
            weights[name] = w - 1
    return weights


# general.architecture -> its entry
GGUF_ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "gpt2": GGUFArchitecture(_gpt2_config, _gpt2_names),
    "llama": GGUFArchitecture(_llama_config, _llama_names, _llama_sanitize),
    "gemma3": GGUFArchitecture(_gemma3_config, _gemma3_names, _gemma3_sanitize),
}


def gguf_architecture(name) -> GGUFArchitecture:
    """The entry for a file's `general.architecture`; ValueError names the supported ones."""
    if name not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {name!r} is not supported "
            f"(supported: {', '.join(GGUF_ARCHITECTURES)})"
        )
    return GGUF_ARCHITECTURES[name]


def metadata_of(metadata: dict, architecture: str) -> dict:
    """The `<architecture>.*` keys of a GGUF's metadata, without the prefix."""
    prefix = f"{architecture}."
    return {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)}
