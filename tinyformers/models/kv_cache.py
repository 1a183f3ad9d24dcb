"""The static KV cache and attention mask shared by every architecture.

Generation preallocates one `KVCache` per layer for prompt + new tokens, so a decode step
writes one column in place and every tensor keeps its shape (what `torch.compile` and CUDA
graphs need). Sequences are left-padded: cache slot s holds token s of the padded row, and
`attention_mask` ([B, S], 1 for real tokens) says which slots are padding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Keys and values of one attention layer for every slot of the padded batch."""

    def __init__(
        self,
        batch: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (batch, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v ([B, nh, T, hs]) at slots `input_pos` ([T]); return the whole cache."""
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


def positions_and_mask(
    attention_mask: Tensor | None, input_pos: Tensor, n_keys: int, batch: int
) -> tuple[Tensor, Tensor]:
    """Position ids [B, T] and the boolean attention mask [B, 1, T, n_keys] for queries at slots
    `input_pos` ([T]) over keys at slots 0..n_keys-1.

    subtle: with left padding a token's position is its count of real tokens before it, not
    its slot (transformers #18478): positions come from the mask, or batched output would
    differ from unbatched. A padding query sees only itself, so its softmax row is never empty
    (an all-masked row gives NaN); its output is junk that nothing reads.
    """
    keys = torch.arange(n_keys, device=input_pos.device)
    causal = keys[None, :] <= input_pos[:, None]  # [T, S]
    if attention_mask is None:
        positions = input_pos[None, :].expand(batch, -1)  # [B, T]
        return positions, causal[None, None]  # [1, 1, T, S]
    real = attention_mask.to(torch.bool)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, input_pos]  # [B, T]
    itself = keys[None, :] == input_pos[:, None]  # [T, S]
    mask = causal[None] & (real[:, None, :n_keys] | itself[None])  # [B, T, S]
    return positions, mask[:, None]  # [B, 1, T, S]
