"""Llama (Touvron et al., 2023) and its family (SmolLM2, Llama 3): RMSNorm, rotary positions,
grouped-query attention and a SwiGLU MLP in pre-norm residual blocks. Mistral adds a sliding
window (each query reads only the last `sliding_window` keys); Qwen2 adds biases to q, k and v.

Shapes: B batch, T tokens in this call, S key slots (T without a cache, the cache length with one),
C = hidden_size, nh = num_attention_heads, nkv = num_key_value_heads, hs = head_dim, V vocab size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyformers.models import check_value, config_fields, prefixed
from tinyformers.models.attention import attention, check_layer_types
from tinyformers.models.hooks import HookPoint, Hooks
from tinyformers.models.kv_cache import KVCache, per_layer
from tinyformers.models.masks import sliding_window, slots_and_mask
from tinyformers.models.rope import Rotary, check_rope_scaling, rotate


@dataclass
class LlamaConfig:
    """The fields of Hugging Face's `LlamaForCausalLM` config.json that change the math
    (and of `MistralForCausalLM` and `Qwen2ForCausalLM`, told apart by `model_type`)."""

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
    attention_dropout: float = 0.0  # of the attention pattern, in training only
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "llama"  # "qwen2": biases on q, k and v (never on o), whatever the keys
    sliding_window: int | None = None  # None: every key; n: a query reads its last n keys
    layer_types: list[str] | None = None  # "sliding_attention" layers use the window; None: all
    max_window_layers: int | None = None  # Qwen2 without layer_types: the first windowed layer

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        """Map a checkpoint's config dict; unknown keys are ignored, missing required ones named."""
        d = family_fields(dict(d))
        if (rope := d.pop("rope_parameters", None)) is not None:  # transformers >= 5 writes this
            check_value("rope_parameters", "dict", rope)
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
        if config.head_dim < 2 or config.head_dim % 2:  # rotary embeddings turn pairs
            raise ValueError(
                f"head_dim = {config.head_dim} (hidden_size {config.hidden_size} // "
                f"num_attention_heads {config.num_attention_heads} unless given): "
                "expected an even number >= 2"
            )
        check_rope_scaling(config.rope_scaling)
        check_layer_types(config.layer_types, config.num_hidden_layers, config.sliding_window)
        return config

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer `i`, or None where it attends to every earlier key.

        subtle: computed per layer, never as a list of every layer's kind up front: a config
        may claim 2^31 layers, and only the weights (checked later) say how many there are.
        """
        if self.layer_types is not None:
            return self.sliding_window if self.layer_types[i] == "sliding_attention" else None
        if self.max_window_layers is not None and i < self.max_window_layers:
            return None
        return self.sliding_window

    # the names the rest of the library reads, whatever a checkpoint calls them
    context_length = property(lambda self: self.max_position_embeddings)
    layer_count = property(lambda self: self.num_hidden_layers)


def family_fields(d: dict) -> dict:
    """`d` with the keys each family's HF config class reads, as that class reads them.

    subtle: HF's classes differ on keys a config.json may carry: Mistral's window defaults to
    4096 when the key is absent (an explicit null is full attention) and applies to every
    layer; Qwen2's window counts only with `use_sliding_window`, and then only from layer
    `max_window_layers` on (or where `layer_types` says). Neither reads the bias switches, and
    Llama reads no window at all.
    """
    kind = d.get("model_type", "llama")
    ignored = ["attention_bias", "mlp_bias"] if kind in ("mistral", "qwen2") else []
    ignored.append("max_window_layers")  # set below for Qwen2 only, when it counts
    if kind == "mistral":
        d.setdefault("sliding_window", 4096)
        ignored.append("layer_types")
    elif kind == "qwen2":
        if not check_value("use_sliding_window", "bool", d.get("use_sliding_window", False)):
            d["sliding_window"] = None
        elif d.setdefault("sliding_window", 4096) is not None and d.get("layer_types") is None:
            first = d.get("max_window_layers", 28)
            if not isinstance(first, int) or isinstance(first, bool) or first < 0:
                raise ValueError(f"max_window_layers = {first!r:.60}: expected an integer >= 0")
            if first > 0:  # 0: every layer windowed, as with no max_window_layers at all
                ignored.remove("max_window_layers")
                d["max_window_layers"] = first
    else:
        ignored += ["sliding_window", "layer_types"]
    return {k: v for k, v in d.items() if k not in ignored}


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich, 2019), computed in float32 as the reference does."""

    def __init__(self, dim: int, eps: float, hooks: Hooks, name: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.hook = HookPoint(hooks, name)

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # rms 1 per token
        return self.weight * self.hook("hook_normalized", x32.to(x.dtype))


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, i: int, hooks: Hooks) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        C, bias = config.hidden_size, config.attention_bias
        qkv_bias = bias or config.model_type == "qwen2"  # Qwen2: q, k, v biased, o not
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=bias)
        self.scale = self.head_dim**-0.5  # 1 / sqrt(hs): keeps q.k near unit variance
        self.dropout_p = config.attention_dropout  # of the pattern, in training only
        self.hook = HookPoint(hooks, f"blocks.{i}.attn.")
        self.fast = False  # set at load: SDPA's fused kernel in place of the written-out math

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
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B,T,nh*hs), 2x(B,T,nkv*hs)
        q = self.hook("hook_q", q.view(B, T, nh, hs)).transpose(1, 2)  # (B, nh, T, hs)
        k = self.hook("hook_k", k.view(B, T, nkv, hs)).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.hook("hook_v", v.view(B, T, nkv, hs)).transpose(1, 2)  # (B, nkv, T, hs)
        return self.attend(q, k, v, cos, sin, mask, cache, input_pos)

    def attend(self, q, k, v, cos, sin, mask, cache, input_pos) -> Tensor:
        """The heads, q (B, nh, T, hs) and k, v (B, nkv, T, hs), rotated, written to the cache
        and attended, then mixed back into (B, T, C); Gemma 3's attention ends the same way."""
        B, nh, T, hs = q.shape
        # Positions enter here, as rotations of q and k, never into the residual stream.
        # (hooks see [B, T, heads, hs] as everywhere; the math runs head-major, contiguous)
        q = self.hook("hook_rot_q", rotate(q, cos, sin).transpose(1, 2)).transpose(1, 2)
        k = self.hook("hook_rot_k", rotate(k, cos, sin).transpose(1, 2)).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(input_pos, k, v)  # (B, nkv, S, hs)
        dropout = self.dropout_p if self.training else 0.0
        z = attention(q, k, v, mask, self.scale, self.hook, self.fast, dropout)  # (B,nh,T,hs)
        z = self.hook("hook_z", z.transpose(1, 2))  # (B, T, nh, hs)
        return self.o_proj(z.reshape(B, T, nh * hs))  # (B, T, nh*hs) -> (B, T, C)


class MLP(nn.Module):
    """SwiGLU (Shazeer, 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, i: int, hooks: Hooks) -> None:
        super().__init__()
        C, H, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(C, H, bias=bias)
        self.up_proj = nn.Linear(C, H, bias=bias)
        self.down_proj = nn.Linear(H, C, bias=bias)
        self.hook = HookPoint(hooks, f"blocks.{i}.mlp.")

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)  # (B, T, C) -> 2 x (B, T, H)
        gate = self.hook("hook_pre", gate)  # (B, T, H)
        post = self.hook("hook_post", F.silu(gate) * up)  # the gate opens or shuts each unit
        return self.down_proj(post)  # (B, T, H) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, i: int, hooks: Hooks) -> None:
        super().__init__()
        C, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(C, eps, hooks, f"blocks.{i}.ln1.")
        self.self_attn = Attention(config, i, hooks)
        self.post_attention_layernorm = RMSNorm(C, eps, hooks, f"blocks.{i}.ln2.")
        self.mlp = MLP(config, i, hooks)
        self.hook = HookPoint(hooks, f"blocks.{i}.")

    def forward(self, x, cos, sin, mask, cache, input_pos) -> Tensor:
        x = self.hook("hook_resid_pre", x)  # (B, T, C): the residual stream
        attn_out = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, input_pos)
        x = self.hook("hook_resid_mid", x + self.hook("hook_attn_out", attn_out))
        mlp_out = self.hook("hook_mlp_out", self.mlp(self.post_attention_layernorm(x)))
        return self.hook("hook_resid_post", x + mlp_out)


class Decoder(nn.Module):
    """The stack under Hugging Face's Llama names, which Gemma 3 shares (gemma3.py): token
    embeddings, the blocks, a final norm, and lm_head (the embedding's matrix when tied)."""

    def __init__(self, config, block: type[nn.Module], norm: type[nn.Module]) -> None:
        super().__init__()
        self.config = config
        self.hooks = Hooks()  # the named activations of this model (models/hooks.py)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            block(config, i, self.hooks) for i in range(config.num_hidden_layers)
        )
        self.norm = norm(config.hidden_size, config.rms_norm_eps, self.hooks, "ln_final.")
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.hook = HookPoint(self.hooks, "")
        # set at load: float16 beside bfloat16 or quantized matrices, as llama.cpp keeps its
        # cache (half the bytes a long-context decode step reads); else the weights' dtype
        self.cache_dtype: torch.dtype | None = None

    def make_cache(self, batch: int, max_len: int) -> list[KVCache]:
        """One full-length cache per layer (a sliding-window layer's mask hides what its
        window left)."""
        c, like = self.config, self.norm.weight
        n_layer, n_kv_head = c.num_hidden_layers, c.num_key_value_heads
        return per_layer(n_layer, batch, n_kv_head, max_len, c.head_dim, like, self.cache_dtype)

    def unembed(self, x: Tensor) -> Tensor:
        """Residual stream (B, T, C) -> float32 logits (B, T, V): final norm, then lm_head."""
        return self.lm_head(self.norm(x)).float()


class Llama(Decoder):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config, Block, RMSNorm)
        # One angle per (position, pair of dimensions), shared by every layer (models/rope.py).
        self.rotary = Rotary(config.head_dim, config.rope_theta, config.rope_scaling)

    @torch.no_grad()
    def init_weights(self) -> None:
        """For training from scratch: every matrix and embedding from N(0, 0.02) (Hugging
        Face's `initializer_range`), the norms' gains 1."""
        for p in self.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)

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
        input_pos, positions, mask = slots_and_mask(input_ids, attention_mask, input_pos, cache)
        window = self.config.sliding_window
        # Mistral (and Qwen2's later layers): a query reads only its last `window` keys
        local = mask if window is None else sliding_window(mask, input_pos, window)
        x = self.hook("hook_embed", self.embed_tokens(input_ids))  # (B, T, C)
        # One angle per (position, pair of dimensions), shared by every layer.
        cos, sin = self.rotary(positions, mask.shape[-1], x.dtype)  # (B, 1, T, hs) each
        windows = [self.config.layer_window(i) for i in range(len(self.layers))]
        masks = [local if w else mask for w in windows]  # (B, 1, T, S) for each layer
        x = self.run_layers(x, cos, sin, masks, cache, input_pos)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        return self.unembed(x)

    def run_layers(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        masks: list[Tensor],
        cache: list[KVCache] | None,
        input_pos: Tensor,
    ) -> Tensor:
        """The residual stream (B, T, C) through every block in turn. A replaceable step: the
        CPU kernels run all of them in one call for decode (kernels/swap.py)."""
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, masks[i], cache[i] if cache is not None else None, input_pos)
        return x


# Checkpoint layout -----------------------------------------------------------------------------


def sanitize(weights: dict[str, Tensor], config: LlamaConfig) -> dict[str, Tensor]:
    """HF LlamaForCausalLM (MistralForCausalLM, Qwen2ForCausalLM) tensors -> our names (no
    `model.` prefix): the three share one layout."""
    out = {}
    for name, w in weights.items():
        name = name.removeprefix("model.")
        if name.endswith("rotary_emb.inv_freq"):  # a buffer old checkpoints saved: recomputed
            continue
        out[name] = w
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def to_hf(weights: dict[str, Tensor], config: LlamaConfig) -> dict[str, Tensor]:
    """Our tensors -> HF's (Llama, Mistral, Qwen2 alike): the `model.` prefix on all but
    lm_head, and no lm_head when it is embed_tokens (HF's own files leave it out)."""
    return prefixed(weights, "model.", config.tie_word_embeddings)


HF_CLASSES = {  # model_type -> the HF class that runs it
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def hf_config(config: LlamaConfig) -> dict:
    """The config.json from which HF's class for `model_type` (and `from_dict`) rebuild this
    model; a null token id stays null (left out, HF would put in its class default).

    subtle: the window keys are written as `family_fields` reads them. Mistral's null window
    stays null (absent means 4096); Qwen2's counts only with use_sliding_window, from layer
    max_window_layers on (absent means 28; 0 is every layer) unless layer_types says.
    """
    d = {k: v for k, v in vars(config).items() if v is not None or k.endswith("_token_id")}
    if config.model_type == "mistral":
        d["sliding_window"] = config.sliding_window
    elif config.model_type == "qwen2" and config.sliding_window is not None:
        d["use_sliding_window"] = True
        d.setdefault("max_window_layers", 0)
    return {"architectures": [HF_CLASSES[config.model_type]], **d}


# The names the registry (models/__init__.py) looks up in every architecture file.
Config = LlamaConfig
Model = Llama
