"""Scaled dot-product attention (Vaswani et al., 2017), written once for every model.

Each model computes its own queries, keys and values (GPT-2 from one fused matrix, Llama with
rotations, Gemma 3 with q/k norms and rotations) and hands them here:

    z = softmax(q k^T * scale, masked) v

with grouped-query attention (Ainslie et al., 2023) where there are fewer key/value heads than
query heads. Shapes: B batch, nh query heads, nkv key/value heads, T queries, S keys, hs head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tinyformers.models.hooks import HookPoint

LAYER_TYPES = ("full_attention", "sliding_attention")  # HF's names of the two layer kinds


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    scale: float,
    hook: HookPoint,
    fast: bool = False,
    dropout: float = 0.0,
) -> Tensor:
    """q (B, nh, T, hs), k and v (B, nkv, S, hs), mask (B, 1, T, S) True where a query may
    read a key -> z (B, nh, T, hs). `hook` names the scores and the pattern; `fast` runs
    SDPA's fused kernel instead unless a hook listens; `dropout` drops pattern entries."""
    nh, nkv = q.shape[1], k.shape[1]
    if fast and not hook.listening:  # the same equation in SDPA's kernel, kv heads not copied
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=nkv != nh
        )
    if nkv != nh:  # each group of nh/nkv query heads shares a key/value head: repeat it
        k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nkv, S, hs) -> (B, nh, S, hs)
        v = v.repeat_interleave(nh // nkv, dim=1)  # (B, nkv, S, hs) -> (B, nh, S, hs)
    scores = q @ k.transpose(-2, -1) * scale  # (B, nh, T, hs) @ (B, nh, hs, S)
    scores = scores.masked_fill(~mask, float("-inf"))  # no future, no padding, no far past
    scores = hook("hook_attn_scores", scores)  # (B, nh, T, S)
    pattern = torch.softmax(scores.float(), dim=-1).to(v.dtype)  # each row sums to 1
    pattern = hook("hook_pattern", pattern)  # (B, nh, T, S)
    if dropout:
        pattern = F.dropout(pattern, dropout)
    return pattern @ v  # (B, nh, T, S) @ (B, nh, S, hs) -> (B, nh, T, hs)


def check_layer_types(kinds, n_layers: int, window: int | None) -> None:
    """ValueError unless a config's `layer_types`, when given, names one of LAYER_TYPES for
    each of its `n_layers` layers, with a `window` for the sliding ones to use."""
    if kinds is None:
        return
    if not isinstance(kinds, list) or len(kinds) != n_layers:
        raise ValueError(f"layer_types = {kinds!r:.60}: expected a list of {n_layers} kinds")
    if unknown := [k for k in kinds if k not in LAYER_TYPES]:
        raise ValueError(f"layer_types: {unknown[0]!r:.60} is not one of {LAYER_TYPES}")
    if "sliding_attention" in kinds and window is None:
        raise ValueError("layer_types names sliding_attention layers but sliding_window is null")
