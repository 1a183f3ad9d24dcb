"""Llama (Touvron et al., 2023) and its family (SmolLM2, Llama 3): RMSNorm, rotary positions,
grouped-query attention and a SwiGLU MLP in pre-norm residual blocks.

Shapes: B batch, T tokens in this call, S key slots (T without a cache, the cache length with one),
C = hidden_size, nh = num_attention_heads, nkv = num_key_value_heads, hs = head_dim, V vocab size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyformers.loading.gguf import unpermute_qk
from tinyformers.models import config_fields, expand_gguf_names
from tinyformers.models.kv_cache import KVCache, positions_and_mask


@dataclass
class LlamaConfig:
    """The fields of Hugging Face's `LlamaForCausalLM` config.json that change the math."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: as many as query heads (no grouping)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or {"rope_type": "llama3", "factor": ...}
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        """Map a checkpoint's config dict; unknown keys are ignored, missing required ones named."""
        d = dict(d)
        if rope := d.pop("rope_parameters", None):  # transformers >= 5 writes rope this way
            d.setdefault("rope_theta", rope.get("rope_theta", cls.rope_theta))
            if rope.get("rope_type", "default") != "default":
                d.setdefault("rope_scaling", rope)
        config = cls(**config_fields(cls, d))
        config.num_key_value_heads = config.num_key_value_heads or config.num_attention_heads
        config.head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (expected silu)")
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {config.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {config.num_key_value_heads}"
            )
        rope_type = (config.rope_scaling or {}).get("rope_type", "default")
        if config.rope_scaling and (config.rope_scaling.get("type") or rope_type) != "llama3":
            raise ValueError(f"rope_scaling {config.rope_scaling} is not supported (only llama3)")
        return config

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich, 2019), computed in float32 as the reference does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_frequencies(config: LlamaConfig, device: torch.device) -> Tensor:
    """The rotation speed of each pair of dimensions (hs/2,): theta^(-2i/hs), llama3-rescaled."""
    hs = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hs, 2, device=device).float() / hs)
    if not config.rope_scaling:
        return inv_freq
    # Llama 3.1: slow dimensions (long wavelengths) are stretched by `factor`, fast ones kept,
    # those in between blended, so a model trained at 8k positions reads 128k.
    s = config.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, blended, scaled)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[i], x[i + hs/2]) by its angle (RoPE, Su et al. 2021; HF layout)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        C, bias = config.hidden_size, config.attention_bias
        # q, k and v projections in one matrix (the checkpoint's three, stacked at load): one
        # pass over x instead of three, which is what decode speed is made of.
        self.sizes = [self.n_head * self.head_dim] + [self.n_kv_head * self.head_dim] * 2
        self.qkv_proj = nn.Linear(C, sum(self.sizes), bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=bias)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        cache: KVCache | None,
        input_pos: Tensor,
    ) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)  # (B, T, nh*hs), 2 x (B, T, nkv*hs)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # positions enter here, not in x
        if cache is not None:
            k, v = cache.update(input_pos, k, v)  # (B, nkv, S, hs)
        # Each group of nh/nkv query heads shares one key/value head (GQA, Ainslie et al. 2023).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B,nh,T,hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, nh*hs) -> (B, T, C)


class MLP(nn.Module):
    """SwiGLU (Shazeer, 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        C, H, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_up_proj = nn.Linear(C, 2 * H, bias=bias)  # gate and up stacked, as q, k, v
        self.down_proj = nn.Linear(H, C, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, C) -> 2 x (B, T, H)
        return self.down_proj(F.silu(gate) * up)  # (B, T, H) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache, input_pos) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def make_cache(self, batch: int, max_len: int) -> list[KVCache]:
        c = self.config
        dtype, device = self.norm.weight.dtype, self.norm.weight.device
        return [
            KVCache(batch, c.num_key_value_heads, max_len, c.head_dim, dtype, device)
            for _ in range(c.num_hidden_layers)
        ]

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        cache: list[KVCache] | None = None,
        input_pos: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Logits (B, T, V) in float32; arguments as `GPT2.forward`."""
        B, T = input_ids.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=input_ids.device)
        n_keys = cache[0].k.shape[2] if cache is not None else T
        positions, mask = positions_and_mask(attention_mask, input_pos, n_keys, B)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        # One angle per (position, pair of dimensions), shared by every layer.
        angles = positions[..., None].float() * rope_frequencies(
            self.config, x.device
        )  # (B,T,hs/2)
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, hs): broadcast over heads
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache[i] if cache is not None else None, input_pos)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        return self.lm_head(self.norm(x)).float()  # (B, T, V)


# Checkpoint layout -----------------------------------------------------------------------------


FUSED = {  # our stacked matrix -> the checkpoint's matrices, in stacking order
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def fuse(weights: dict[str, Tensor], config: LlamaConfig) -> dict[str, Tensor]:
    """Stack each layer's q, k, v (and gate, up) rows into one matrix; any tensor type works,
    so a GGUF file's quantized blocks stack the same way.

    A group with a member missing stays as it is: the loader's strict key check then names
    what is missing, and a GGUF whose q, k, v blocks are not all of one kind keeps the dense
    weights for that matrix.
    """
    for i in range(config.num_hidden_layers):
        for ours, theirs in FUSED.items():
            for kind in ("weight", "bias"):
                keys = [f"layers.{i}.{t}.{kind}" for t in theirs]
                if all(k in weights for k in keys):
                    weights[f"layers.{i}.{ours}.{kind}"] = torch.cat([weights.pop(k) for k in keys])
    return weights


def sanitize(weights: dict[str, Tensor], config: LlamaConfig) -> dict[str, Tensor]:
    """HF LlamaForCausalLM tensors -> our names (no `model.` prefix) and stacked matrices."""
    out = {}
    for name, w in weights.items():
        name = name.removeprefix("model.")
        if name.endswith("rotary_emb.inv_freq"):  # a buffer old checkpoints saved: recomputed
            continue
        out[name] = w
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return fuse(out, config)


def gguf_config(metadata: dict, n_vocab: int) -> LlamaConfig:
    """The config of a llama.cpp `llama` GGUF, from its `llama.*` metadata."""
    m = {k.removeprefix("llama."): v for k, v in metadata.items() if k.startswith("llama.")}
    n_head = m.get("attention.head_count")
    return LlamaConfig.from_dict(
        {
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
    )


def gguf_names(config: LlamaConfig) -> dict[str, str]:
    """GGUF tensor name -> our name, for llama.cpp's llama conversion."""
    names = {
        "token_embd.weight": "embed_tokens.weight",
        "output_norm.weight": "norm.weight",
        "output.weight": "lm_head.weight",
    }
    per_layer = {
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
    return expand_gguf_names(names, per_layer, config.num_hidden_layers)


def sanitize_gguf(weights: dict[str, Tensor], config: LlamaConfig) -> dict[str, Tensor]:
    """Undo llama.cpp's q/k row permutation (made for its interleaved rope) to HF's layout."""
    for name, n_head in (
        ("q_proj", config.num_attention_heads),
        ("k_proj", config.num_key_value_heads),
    ):
        for i in range(config.num_hidden_layers):
            key = f"layers.{i}.self_attn.{name}.weight"
            if key in weights:
                weights[key] = unpermute_qk(weights[key], n_head)
    return fuse(weights, config)


# The names the registry (models/__init__.py) looks up in every architecture file.
Config = LlamaConfig
Model = Llama
