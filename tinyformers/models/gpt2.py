"""GPT-2 (Radford et al., 2019): decoder-only transformer, learned positions, pre-LN blocks.

Shapes: B batch, T tokens in this call, S key slots (T without a cache, the cache length with one),
C = n_embd, nh = n_head, hs = head_dim (C // nh unless given), V vocab size. The attention's
width is nh * hs, which is C except in one rank's shard under tensor parallel (fewer heads).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyformers.models import config_fields
from tinyformers.models.attention import attention
from tinyformers.models.hooks import HookPoint, Hooks
from tinyformers.models.kv_cache import KVCache, per_layer
from tinyformers.models.masks import slots_and_mask

ACTIVATIONS = {
    "gelu_new": partial(F.gelu, approximate="tanh"),  # the original GPT-2 tanh approximation
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass
class GPT2Config:
    """The fields of Hugging Face's GPT-2 `config.json` that change the math."""

    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int | None = None  # None: 4 * n_embd
    head_dim: int | None = None  # None: n_embd // n_head (not in HF's config: set for a shard)
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Dropout while training (none at inference): of the embeddings' sum, of the attention
    # pattern, and of each branch's output before it joins the residual stream.
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1

    @classmethod
    def from_dict(cls, d: dict) -> GPT2Config:
        """Map a checkpoint's config dict; unknown keys are ignored, missing required ones named."""
        config = cls(**config_fields(cls, d))
        if config.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"activation_function {config.activation_function!r} is not supported "
                f"(expected one of {', '.join(ACTIVATIONS)})"
            )
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd {config.n_embd} is not a multiple of n_head {config.n_head}")
        return config

    # the names the rest of the library reads, whatever a checkpoint calls them
    context_length = property(lambda self: self.n_positions)
    layer_count = property(lambda self: self.n_layer)


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dimension (Ba et al., 2016)."""

    def __init__(self, dim: int, eps: float, hooks: Hooks, name: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self.hook = HookPoint(hooks, name)
        self.fast = False  # set at load: torch's fused layer_norm, the same math in one kernel

    def forward(self, x: Tensor) -> Tensor:
        if self.fast and not self.hook.listening:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        x = x - x.mean(-1, keepdim=True)  # (B, T, C), centred
        scale = (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()  # (B, T, 1): the std
        x = self.hook("hook_normalized", x / scale)  # mean 0, variance 1 per token
        return x * self.weight + self.bias


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, hooks: Hooks) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_size = head_size = config.head_dim or config.n_embd // config.n_head
        width = self.n_head * head_size  # n_embd, or a shard's heads only (tensor parallel)
        # q, k and v projections fused in one matrix, as the checkpoint stores them.
        self.c_attn = nn.Linear(config.n_embd, 3 * width)
        self.c_proj = nn.Linear(width, config.n_embd)
        self.scale = 1 / math.sqrt(head_size) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:  # a stability trick of some GPT-2 variants
            self.scale /= layer_idx + 1
        self.upcast = config.reorder_and_upcast_attn  # scores and softmax in float32
        self.dropout_p = config.attn_pdrop  # of the pattern, in training only
        self.hook = HookPoint(hooks, f"blocks.{layer_idx}.attn.")
        self.fast = False  # set at load: SDPA's fused kernel in place of the written-out math

    def forward(self, x: Tensor, mask: Tensor, cache: KVCache | None, input_pos: Tensor) -> Tensor:
        B, T, C = x.shape
        nh, hs = self.n_head, self.head_size
        q, k, v = self.c_attn(x).split(nh * hs, dim=2)  # 3 x (B, T, nh*hs): nh*hs = C
        q = self.hook("hook_q", q.view(B, T, self.n_head, hs)).transpose(1, 2)  # (B, nh, T, hs)
        k = self.hook("hook_k", k.view(B, T, self.n_head, hs)).transpose(1, 2)  # (B, nh, T, hs)
        v = self.hook("hook_v", v.view(B, T, self.n_head, hs)).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(input_pos, k, v)  # (B, nh, S, hs)
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        dropout = self.dropout_p if self.training else 0.0
        z = attention(q, k, v, mask, self.scale, self.hook, self.fast, dropout)  # (B,nh,T,hs)
        z = self.hook("hook_z", z.to(x.dtype).transpose(1, 2))  # (B, T, nh, hs)
        return self.c_proj(z.reshape(B, T, nh * hs))  # heads side by side again, then mixed


class MLP(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, hooks: Hooks) -> None:
        super().__init__()
        n_inner = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, n_inner)
        self.act = ACTIVATIONS[config.activation_function]
        self.c_proj = nn.Linear(n_inner, config.n_embd)
        self.hook = HookPoint(hooks, f"blocks.{layer_idx}.mlp.")

    def forward(self, x: Tensor) -> Tensor:
        pre = self.hook("hook_pre", self.c_fc(x))  # (B, T, C) -> (B, T, 4C)
        post = self.hook("hook_post", self.act(pre))  # (B, T, 4C)
        return self.c_proj(post)  # (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPT2Config, i: int, hooks: Hooks) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.n_embd, eps, hooks, f"blocks.{i}.ln1.")
        self.attn = CausalSelfAttention(config, i, hooks)
        self.ln_2 = LayerNorm(config.n_embd, eps, hooks, f"blocks.{i}.ln2.")
        self.mlp = MLP(config, i, hooks)
        self.dropout_p = config.resid_pdrop  # of each branch's output, in training only
        self.hook = HookPoint(hooks, f"blocks.{i}.")

    def forward(self, x: Tensor, mask: Tensor, cache: KVCache | None, input_pos: Tensor) -> Tensor:
        x = self.hook("hook_resid_pre", x)  # (B, T, C): the residual stream
        attn_out = self.hook("hook_attn_out", self.attn(self.ln_1(x), mask, cache, input_pos))
        x = self.hook("hook_resid_mid", x + self.drop(attn_out))
        mlp_out = self.hook("hook_mlp_out", self.mlp(self.ln_2(x)))
        return self.hook("hook_resid_post", x + self.drop(mlp_out))

    def drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout_p) if self.training and self.dropout_p else x


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.hooks = Hooks()  # the named activations of this model (models/hooks.py)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)  # learned positions
        self.h = nn.ModuleList(Block(config, i, self.hooks) for i in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon, self.hooks, "ln_final.")
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight  # one matrix reads tokens in and out
        self.dropout_p = config.embd_pdrop  # of the embeddings' sum, in training only
        self.hook = HookPoint(self.hooks, "")
        # set at load: float16 beside bfloat16 or quantized matrices, as llama.cpp keeps its
        # cache (half the bytes a decode step's attention reads); else the weights' dtype
        self.cache_dtype: torch.dtype | None = None

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2's initialisation, for training from scratch: every matrix and embedding from
        N(0, 0.02), biases 0, norms 1; the matrices that write into the residual stream
        (c_proj) from N(0, 0.02 / sqrt(2 n_layer)), so the stream's variance stays about the
        same however many blocks add to it (Radford et al., 2019, section 2.3)."""
        for name, module in self.named_modules():
            if isinstance(module, LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, nn.Linear | nn.Embedding):
                residual = name.endswith("c_proj")
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if residual else 0.02
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()

    def make_cache(self, batch: int, max_len: int) -> list[KVCache]:
        c = self.config
        hs = c.head_dim or c.n_embd // c.n_head
        return per_layer(
            c.n_layer, batch, c.n_head, max_len, hs, self.ln_f.weight, self.cache_dtype
        )

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        cache: list[KVCache] | None = None,
        input_pos: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Logits (B, T, V) in float32 for `input_ids` (B, T).

        attention_mask: (B, S), 1 for real tokens and 0 for left padding, over every key slot.
        cache, input_pos: the slots (T,) these tokens go to in the preallocated cache.
        last_only: logits of the last position only (B, 1, V), all a decode step needs.
        """
        input_pos, positions, mask = slots_and_mask(input_ids, attention_mask, input_pos, cache)
        x = self.hook("hook_embed", self.wte(input_ids))  # (B, T, C)
        x = x + self.hook("hook_pos_embed", self.wpe(positions))  # (B, T, C)
        if self.training and self.dropout_p:
            x = F.dropout(x, self.dropout_p)
        for i, block in enumerate(self.h):
            x = block(x, mask, cache[i] if cache is not None else None, input_pos)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        return self.unembed(x)

    def unembed(self, x: Tensor) -> Tensor:
        """Residual stream (B, T, C) -> float32 logits (B, T, V): final norm, then lm_head."""
        return self.lm_head(self.ln_f(x)).float()


# Checkpoint layout -----------------------------------------------------------------------------

# GPT-2 was trained with "Conv1D" layers that store weights as (in, out); nn.Linear wants (out, in).
CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
# Causal-mask buffers saved by old versions of transformers: not weights.
BUFFERS = re.compile(r"h\.\d+\.attn\.(masked_)?bias")


def sanitize(weights: dict[str, Tensor], config: GPT2Config) -> dict[str, Tensor]:
    """HF GPT-2 tensors (GPT2Model or GPT2LMHeadModel, any vintage) -> our names and layout."""
    out = {}
    for name, w in weights.items():
        name = name.removeprefix("transformer.")
        if BUFFERS.fullmatch(name):
            continue
        out[name] = w.t() if CONV1D.fullmatch(name) else w  # (in, out) -> (out, in)
    head = out.pop("lm_head.weight", None) if config.tie_word_embeddings else None
    wte = out.get("wte.weight")
    if head is not None and wte is not None and not head.is_meta and not torch.equal(head, wte):
        # What transformers does too: with tied embeddings the file's lm_head is not used.
        warnings.warn(
            "lm_head.weight differs from wte.weight but the config ties them: using wte",
            stacklevel=2,
        )
    return out


def to_hf(weights: dict[str, Tensor], config: GPT2Config) -> dict[str, Tensor]:
    """Our tensors -> HF GPT2LMHeadModel's, what `sanitize` undoes: the `transformer.` prefix,
    Conv1D's (in, out) layout, and no lm_head when it is wte (HF's own files leave it out)."""
    out = {}
    for name, w in weights.items():
        if name == "lm_head.weight":
            if not config.tie_word_embeddings:
                out[name] = w
            continue
        if CONV1D.fullmatch(name):
            w = w.t()  # (out, in) -> (in, out), as Conv1D stores it
        out[f"transformer.{name}"] = w
    return out


def hf_config(config: GPT2Config) -> dict:
    """The config.json from which HF's GPT2LMHeadModel (and `from_dict`) rebuild this model.

    A null token id stays null: left out, HF would put in its class default (50256). head_dim
    is ours only (a tensor-parallel shard's); HF derives n_embd // n_head.
    """
    fields = {k: v for k, v in vars(config).items() if v is not None or k.endswith("_token_id")}
    fields.pop("head_dim", None)
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **fields}


# The names the registry (models/__init__.py) looks up in every architecture file.
Config = GPT2Config
Model = GPT2
