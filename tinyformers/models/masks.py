"""Which key slots each query may read: causal, left padding, and a sliding window.

Sequences are left-padded: slot s holds token s of the padded row, and `attention_mask`
([B, S], 1 for real tokens) says which slots are padding. A mask is boolean, True where the
query may attend, shaped [B, 1, T, S] to broadcast over heads.
"""

from __future__ import annotations

import torch
from torch import Tensor


def positions_and_mask(
    attention_mask: Tensor | None, input_pos: Tensor, n_keys: int, batch: int
) -> tuple[Tensor, Tensor]:
    """Position ids [B, T] and the causal padding mask [B, 1, T, n_keys] for queries at slots
    `input_pos` ([T], or [B, T] when each row has its own) over keys at slots 0..n_keys-1.

    subtle: with left padding a token's position is its count of real tokens before it, not
    its slot (transformers #18478): positions come from the mask, or batched output would
    differ from unbatched. A padding query sees only itself, so its softmax row is never empty
    (an all-masked row gives NaN); its output is junk that nothing reads.
    """
    keys = torch.arange(n_keys, device=input_pos.device)
    input_pos = input_pos.expand(batch, -1)  # [B, T]
    causal = keys <= input_pos[..., None]  # [B, T, S]
    if attention_mask is None:
        return input_pos, causal[:, None]  # positions are the slots; mask [B, 1, T, S]
    real = attention_mask.to(torch.bool)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0).gather(1, input_pos)  # [B, T]
    itself = keys == input_pos[..., None]  # [B, T, S]
    mask = causal & (real[:, None, :n_keys] | itself)  # [B, T, S]
    return positions, mask[:, None]  # [B, 1, T, S]


def slots_and_mask(
    input_ids: Tensor, attention_mask: Tensor | None, input_pos: Tensor | None, cache: list | None
) -> tuple[Tensor, Tensor, Tensor]:
    """What each model's forward starts from: the slots [T] its tokens `input_ids` [B, T] go
    to (`input_pos`, else 0..T-1), their position ids [B, T] and the mask [B, 1, T, S] over S
    key slots: the length of the `cache` (one KVCache per layer), else the T tokens alone."""
    B, T = input_ids.shape
    if input_pos is None:
        input_pos = torch.arange(T, device=input_ids.device)
    n_keys = cache[0].k.shape[2] if cache is not None else T
    return input_pos, *positions_and_mask(attention_mask, input_pos, n_keys, B)


def sliding_window(mask: Tensor, input_pos: Tensor, window: int) -> Tensor:
    """`mask` ([B, 1, T, S]) narrowed to the last `window` keys of each query: a query at slot
    i reads slots i - window + 1 .. i (Mistral, Gemma's local layers; HF's `kv > q - window`).

    Padding is all on the left, so the slot distance between two real tokens is also their
    position distance: counting in slots is counting in tokens.
    """
    keys = torch.arange(mask.shape[-1], device=mask.device)
    recent = keys > input_pos.expand(mask.shape[0], -1)[..., None] - window  # [B, T, S]
    return mask & recent[:, None]
