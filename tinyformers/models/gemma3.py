"""Gemma 3 (Gemma Team, 2025), the text model: Llama's pre-norm blocks with a norm after each
sublayer too, q and k normalized per head, a GeGLU MLP, and attention that alternates between
five local layers (a sliding window, RoPE base 10k) and one global layer (every token, RoPE
base 1M, optionally scaled). The embedding is scaled by sqrt(hidden_size) and tied to lm_head.

Shapes: B batch, T tokens in this call, S key slots (T without a cache, the cache length with one),
C = hidden_size, nh = num_attention_heads, nkv = num_key_value_heads, hs = head_dim,
H = intermediate_size, V vocab size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyformers.models import check_value, config_fields, llama, prefixed
from tinyformers.models.attention import LAYER_TYPES, check_layer_types
from tinyformers.models.hooks import HookPoint, Hooks
from tinyformers.models.kv_cache import KVCache
from tinyformers.models.masks import sliding_window, slots_and_mask
from tinyformers.models.rope import Rotary, check_rope_scaling

GLOBAL, LOCAL = LAYER_TYPES  # full attention, or a sliding window


@dataclass
class Gemma3Config:
    """The fields of Hugging Face's `Gemma3TextConfig` that change the math.

    The defaults are HF's: the `text_config` of a multimodal Gemma 3 checkpoint leaves out every
    key that equals them (gemma-3-4b's has no vocab_size, num_attention_heads, head_dim ...).
    """

    vocab_size: int = 262_208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # global layers
    rope_scaling: dict | None = None  # global layers only: None or {"rope_type": "linear", ...}
    rope_local_base_freq: float = 10_000.0  # sliding-window layers, never scaled
    query_pre_attn_scalar: float = 256  # scores are scaled by its -1/2 power, not head_dim's
    sliding_window: int = 4096
    sliding_window_pattern: int = 6  # without layer_types: every 6th layer is global
    layer_types: list[str] | None = None  # "sliding_attention" / "full_attention" per layer
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    # Gemma 2's tanh caps; Gemma 3 has none. Read only to refuse a config that sets them.
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    use_bidirectional_attention: bool = False  # EmbeddingGemma: refused, we are causal
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    attention_dropout: float = 0.0  # of the attention pattern, in training only
    # What the Llama modules that Gemma's build on read, fixed for Gemma 3 (not fields: never
    # read from a config.json nor written to one): no Qwen2 biases on q/k/v, none in the MLP.
    model_type = "gemma3_text"
    mlp_bias = False

    @classmethod
    def from_dict(cls, d: dict) -> Gemma3Config:
        """Map a checkpoint's config dict (model_type gemma3_text, or gemma3 with the text model
        under `text_config`); unknown keys are ignored."""
        if d.get("model_type") == "gemma3":  # image + text: we run the text half
            d = check_value("text_config", "dict", d.get("text_config", {}))
        d = dict(d)
        if (rope := d.pop("rope_parameters", None)) is not None:  # transformers >= 5 writes this
            check_value("rope_parameters", "dict", rope)
            # one entry per layer kind since transformers 5; a single entry is the global one
            full = check_value("rope_parameters.full_attention", "dict", rope.get(GLOBAL, rope))
            local = check_value("rope_parameters.sliding_attention", "dict", rope.get(LOCAL, {}))
            d.setdefault("rope_theta", full.get("rope_theta"))
            d.setdefault("rope_local_base_freq", local.get("rope_theta"))
            if full.get("rope_type", "default") != "default":
                d.setdefault("rope_scaling", full)
            if local.get("rope_type", "default") != "default":
                raise ValueError(f"rope_parameters.sliding_attention {local!r:.80}: not supported")
        config = cls(**config_fields(cls, d))
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, name) is not None:
                raise ValueError(f"{name} is not supported (Gemma 3 has none)")
        if config.use_bidirectional_attention:
            raise ValueError("use_bidirectional_attention is not supported (causal models only)")
        if config.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(
                f"hidden_activation {config.hidden_activation!r} is not supported "
                "(expected gelu_pytorch_tanh)"
            )
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {config.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {config.num_key_value_heads}"
            )
        if config.head_dim % 2:  # rotary embeddings turn pairs
            raise ValueError(f"head_dim = {config.head_dim}: expected an even number")
        check_layer_types(config.layer_types, config.num_hidden_layers, config.sliding_window)
        check_rope_scaling(config.rope_scaling)
        return config

    def layer_kind(self, i: int) -> str:
        """Layer `i`'s attention: from `layer_types`, else every `sliding_window_pattern`-th
        layer global (layers 5, 11, 17 ... for 6), as HF derives it for older configs.

        subtle: computed per layer, never as a list of every layer's kind up front: a config
        may claim 2^31 layers, and only the weights (checked later) say how many there are.
        """
        if self.layer_types is not None:
            return self.layer_types[i]
        return GLOBAL if (i + 1) % self.sliding_window_pattern == 0 else LOCAL

    context_length = llama.LlamaConfig.context_length  # Llama's names, read the same way
    layer_count = llama.LlamaConfig.layer_count


class RMSNorm(llama.RMSNorm):
    """x / rms(x) * (1 + weight): Gemma stores the gain minus 1, so a zero weight is the identity.

    subtle: the gain multiplies in float32 before the cast back, as HF's Gemma3RMSNorm does
    (Llama's casts first); in bfloat16 the two orders round differently.
    """

    def __init__(self, dim: int, eps: float, hooks: Hooks, name: str) -> None:
        super().__init__(dim, eps, hooks, name)
        self.weight.data.zero_()  # the gain 1 + 0

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # rms 1 per vector
        x32 = self.hook("hook_normalized", x32)  # float32, before the gain
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class Attention(llama.Attention):
    """Llama's grouped-query attention with rotary positions (its projections, hooks and
    `fast`), with each head's q and k RMS-normalized before the rotation (QK-norm, Dehghani et
    al. 2023): it bounds the scores, and took the place of Gemma 2's tanh soft-capping."""

    def __init__(self, config: Gemma3Config, i: int, hooks: Hooks) -> None:
        super().__init__(config, i, hooks)
        eps = config.rms_norm_eps
        self.q_norm = RMSNorm(self.head_dim, eps, hooks, f"blocks.{i}.attn.q_norm.")
        self.k_norm = RMSNorm(self.head_dim, eps, hooks, f"blocks.{i}.attn.k_norm.")
        # 1 / sqrt(query_pre_attn_scalar): head_dim for most sizes, hidden / heads for 27B
        self.scale = config.query_pre_attn_scalar**-0.5

    def forward(self, x, cos, sin, mask, cache, input_pos) -> Tensor:
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B,T,nh*hs), 2x(B,T,nkv*hs)
        q = self.q_norm(self.hook("hook_q", q.view(B, T, nh, hs))).transpose(1, 2)  # (B,nh,T,hs)
        k = self.k_norm(self.hook("hook_k", k.view(B, T, nkv, hs))).transpose(1, 2)  # (B,nkv,T,hs)
        v = self.hook("hook_v", v.view(B, T, nkv, hs)).transpose(1, 2)  # (B, nkv, T, hs)
        # then as Llama's: rotated (by the local or global angles of this layer), cached, attended
        return self.attend(q, k, v, cos, sin, mask, cache, input_pos)  # (B, T, C)


class MLP(llama.MLP):
    """GeGLU (Shazeer, 2020): down(gelu(gate(x)) * up(x)), GELU in its tanh approximation;
    Llama's gated MLP (its projections) with GELU for SiLU."""

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)  # (B, T, C) -> 2 x (B, T, H)
        gate = self.hook("hook_pre", gate)  # (B, T, H)
        post = self.hook("hook_post", F.gelu(gate, approximate="tanh") * up)
        return self.down_proj(post)  # (B, T, H) -> (B, T, C)


class Block(nn.Module):
    """Sandwich norms: each sublayer's input is normalized (ln1, ln2) and so is its output
    (ln1_post, ln2_post) before it joins the residual stream.

    subtle: HF calls ln1_post `post_attention_layernorm`, the name Llama gives its ln2.
    """

    def __init__(self, config: Gemma3Config, i: int, hooks: Hooks) -> None:
        super().__init__()
        C, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(C, eps, hooks, f"blocks.{i}.ln1.")
        self.self_attn = Attention(config, i, hooks)
        self.post_attention_layernorm = RMSNorm(C, eps, hooks, f"blocks.{i}.ln1_post.")  # not ln2
        self.pre_feedforward_layernorm = RMSNorm(C, eps, hooks, f"blocks.{i}.ln2.")
        self.mlp = MLP(config, i, hooks)
        self.post_feedforward_layernorm = RMSNorm(C, eps, hooks, f"blocks.{i}.ln2_post.")
        self.hook = HookPoint(hooks, f"blocks.{i}.")

    def forward(self, x, cos, sin, mask, cache, input_pos) -> Tensor:
        x = self.hook("hook_resid_pre", x)  # (B, T, C): the residual stream
        attn_out = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, input_pos)
        attn_out = self.hook("hook_attn_out", self.post_attention_layernorm(attn_out))
        x = self.hook("hook_resid_mid", x + attn_out)
        mlp_out = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return self.hook("hook_resid_post", x + self.hook("hook_mlp_out", mlp_out))


class Gemma3(llama.Decoder):
    def __init__(self, config: Gemma3Config) -> None:
        super().__init__(config, Block, RMSNorm)  # Llama's stack, Gemma's blocks and norms
        # Two sets of angles, each shared by the layers of its kind (models/rope.py): local
        # layers turn with base 10k, global ones with base 1M (and linear scaling on 4B+).
        self.rotary = {
            LOCAL: Rotary(config.head_dim, config.rope_local_base_freq),
            GLOBAL: Rotary(config.head_dim, config.rope_theta, config.rope_scaling),
        }

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        cache: list[KVCache] | None = None,
        input_pos: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Logits (B, T, V) in float32; arguments as `GPT2.forward`. Each layer reads the
        mask and the angles of its kind: local (windowed, base 10k) or global."""
        input_pos, positions, mask = slots_and_mask(input_ids, attention_mask, input_pos, cache)
        masks = {GLOBAL: mask, LOCAL: sliding_window(mask, input_pos, self.config.sliding_window)}
        x = self.embed_tokens(input_ids)  # (B, T, C)
        # sqrt(C) rounded to the model's dtype first, as HF does (25.25, not 25.30, in bf16)
        x = self.hook("hook_embed", x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype))
        S = mask.shape[-1]  # key slots
        angles = {kind: rotary(positions, S, x.dtype) for kind, rotary in self.rotary.items()}
        for i, layer in enumerate(self.layers):
            kind = self.config.layer_kind(i)
            cos, sin = angles[kind]  # (B, 1, T, hs) each: for every head
            layer_cache = cache[i] if cache is not None else None
            x = layer(x, cos, sin, masks[kind], layer_cache, input_pos)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        return self.unembed(x)


# Checkpoint layout -----------------------------------------------------------------------------

# Where the text model's tensors sit: Gemma3ForCausalLM (model.), Gemma3ForConditionalGeneration
# since transformers 4.52 (model.language_model.) and before it (language_model.model.).
_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_IMAGE_PARTS = ("vision_tower.", "multi_modal_projector.")  # the image encoder: not run here


def sanitize(weights: dict[str, Tensor], config: Gemma3Config) -> dict[str, Tensor]:
    """HF Gemma3ForCausalLM / Gemma3ForConditionalGeneration tensors -> our names: the text
    model's, wherever the class put them, then as Llama's (`llama.sanitize`)."""
    text = {}
    for name, w in weights.items():
        name = next((name.removeprefix(p) for p in _PREFIXES if name.startswith(p)), name)
        if not name.startswith(_IMAGE_PARTS):
            text[name] = w
    return llama.sanitize(text, config)


def to_hf(weights: dict[str, Tensor], config: Gemma3Config) -> dict[str, Tensor]:
    """Our tensors -> HF Gemma3ForCausalLM's (the text model alone, whatever the source held):
    the `model.` prefix on all but lm_head, and no lm_head when it is embed_tokens. The norm
    weights are HF's already (the gain minus 1), so nothing else changes."""
    return prefixed(weights, "model.", config.tie_word_embeddings)


def hf_config(config: Gemma3Config) -> dict:
    """The config.json (model_type gemma3_text, never nested under text_config) from which
    HF's Gemma3ForCausalLM (and `from_dict`) rebuild this model.

    layer_types is written out, one kind per (real) layer: transformers reads the older
    sliding_window_pattern only as a fallback. A null token id stays null (left out, HF would
    put in its class default).
    """
    d = {k: v for k, v in vars(config).items() if v is not None or k.endswith("_token_id")}
    d["layer_types"] = [config.layer_kind(i) for i in range(config.num_hidden_layers)]
    return {"model_type": config.model_type, "architectures": ["Gemma3ForCausalLM"], **d}


# The names the registry (models/__init__.py) looks up in every architecture file.
Config = Gemma3Config
Model = Gemma3
