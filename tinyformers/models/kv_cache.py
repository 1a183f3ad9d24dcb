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
        """Write k, v ([B, nh, T, hs]) at slots `input_pos`, [T] for every row or [B, T] a row
        each (rows of a continuous batch sit at different positions); return the whole cache."""
        if input_pos.dim() == 1:
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]  # [B, 1]
            # subtle: indices split by a slice put their dims first: [B, T, nh, hs]
            self.k[rows, :, input_pos] = k.transpose(1, 2)
            self.v[rows, :, input_pos] = v.transpose(1, 2)
        return self.k, self.v

    def rows(self, index: slice | tuple) -> KVCache:
        """A view of part of this cache ([B, nh, S, hs] indexed by `index`), sharing its
        memory: `rows(slice(2, 3))` is row 2, where a prompt prefilled alone lands in its
        row of the batch; `rows((rows, slice(None), slice(0, n)))` is some rows and only their
        first n slots, so attention reads no slot that no row has filled."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[index], persistent=False)
        view.register_buffer("v", self.v[index], persistent=False)
        return view


def positions_and_mask(
    attention_mask: Tensor | None, input_pos: Tensor, n_keys: int, batch: int
) -> tuple[Tensor, Tensor]:
    """Position ids [B, T] and the boolean attention mask [B, 1, T, n_keys] for queries at slots
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
