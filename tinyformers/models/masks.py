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


def sliding_window(mask: Tensor, input_pos: Tensor, window: int) -> Tensor:
    """`mask` ([B, 1, T, S]) narrowed to the last `window` keys of each query: a query at slot
    i reads slots i - window + 1 .. i (Mistral, Gemma's local layers; HF's `kv > q - window`).

    Padding is all on the left, so the slot distance between two real tokens is also their
    position distance: counting in slots is counting in tokens.
    """
    keys = torch.arange(mask.shape[-1], device=mask.device)
    recent = keys > input_pos.expand(mask.shape[0], -1)[..., None] - window  # [B, T, S]
    return mask & recent[:, None]
