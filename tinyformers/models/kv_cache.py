"""The static KV cache shared by every architecture (the masks that read it: models/masks.py).

Generation preallocates one `KVCache` per layer for prompt + new tokens, so a decode step
writes one column in place and every tensor keeps its shape (what `torch.compile` and CUDA
graphs need). Sequences are left-padded: cache slot s holds token s of the padded row.
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
        each (rows of a continuous batch sit at different positions); return the whole cache,
        in k's dtype (a float16 cache of a model computing in float32 is read as float32)."""
        dtype = k.dtype
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if input_pos.dim() == 1:
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]  # [B, 1]
            # subtle: indices split by a slice put their dims first: [B, T, nh, hs]
            self.k[rows, :, input_pos] = k.transpose(1, 2)
            self.v[rows, :, input_pos] = v.transpose(1, 2)
        return self.k.to(dtype), self.v.to(dtype)

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


def per_layer(
    n_layer: int,
    batch: int,
    n_kv_head: int,
    max_len: int,
    head_dim: int,
    like: Tensor,
    dtype: torch.dtype | None = None,
) -> list[KVCache]:
    """One cache per layer on the device of `like` (a model's weight), in `dtype`, else in
    like's dtype."""
    return [
        KVCache(batch, n_kv_head, max_len, head_dim, dtype or like.dtype, like.device)
        for _ in range(n_layer)
    ]
