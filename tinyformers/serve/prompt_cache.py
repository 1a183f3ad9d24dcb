"""The prompt cache: keys and values already computed for a token prefix, reused by a later
request that starts with the same tokens (the same conversation one turn later, a shared system
prompt), so the engine prefills only the rest of its prompt.

Keys and values live in a pool of blocks of `BLOCK` tokens, one pair of tensors per layer
shaped [blocks, nkv, BLOCK, hs] like the engine's rows. A block is found by its parent block
and its own tokens: the same tokens after another prefix have other keys and values. Blocks are
evicted least recently used first, and a block is always used more recently than the blocks
that continue it, so eviction takes a leaf and never strands a chain's tail.

subtle: the key and value at slot s depend only on tokens 0..s and their positions, and every
prompt starts at slot 0 of its row (the engine does not pad), so a block copied from one row is
what a fresh prefill would write into any other row: positions (GPT-2's learned ones, RoPE's
angles) are the slots.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch

from tinyformers.models.kv_cache import KVCache

BLOCK = 16  # tokens a block: a prefix is matched to the last whole block it shares


@dataclass
class Block:
    slot: int  # where its keys and values sit in the pool
    serial: int  # never reused, so a block evicted and refilled is no one's parent by mistake


Key = tuple[int, tuple[int, ...]]  # (the parent block's serial, 0 at the start; its tokens)


class PromptCache:
    """At most `tokens` tokens of keys and values in blocks, beside the rows of `rows`.

    Example:
        >>> cache = PromptCache(engine.cache, tokens=16384)
        >>> start = cache.load(prompt, row=2, limit=len(prompt) - 1)  # then prefill from start
    """

    def __init__(self, rows: list[KVCache], tokens: int, block: int = BLOCK) -> None:
        self.rows, self.block = rows, block
        n = tokens // block

        def pool(t: torch.Tensor) -> torch.Tensor:  # [B, nkv, S, hs] -> [n, nkv, block, hs]
            # empty: on the CPU the pages are only taken as blocks are written
            return torch.empty(n, t.shape[1], block, t.shape[3], dtype=t.dtype, device=t.device)

        self.k = [pool(c.k) for c in rows]
        self.v = [pool(c.v) for c in rows]
        self.blocks: OrderedDict[Key, Block] = OrderedDict()  # least recently used first
        self.free = list(range(n))
        self.serials = itertools.count(1)

    def __len__(self) -> int:
        """Tokens held."""
        return len(self.blocks) * self.block

    def load(self, tokens: list[int], row: int, limit: int) -> int:
        """Copy the longest cached prefix of `tokens` into slots 0.. of `row`; return how many
        tokens it covers, at most `limit` (a prefill needs one token left to give logits)."""
        chain = self._chain(tokens)
        if not chain:
            return 0
        self._touch(chain)
        index = torch.tensor([b.slot for _, b in chain], device=self.k[0].device)
        n = len(chain) * self.block
        for c, k, v in zip(self.rows, self.k, self.v, strict=True):
            nkv, hs = k.shape[1], k.shape[3]
            # [m, nkv, block, hs] -> [nkv, m, block, hs] -> [nkv, m*block, hs]
            c.k[row, :, :n] = k[index].transpose(0, 1).reshape(nkv, n, hs)
            c.v[row, :, :n] = v[index].transpose(0, 1).reshape(nkv, n, hs)
        return min(n, limit)

    def store(self, tokens: list[int], row: int) -> None:
        """Keep the whole blocks of `tokens`, whose keys and values fill slots 0.. of `row`,
        that are not cached yet, evicting the least recently used blocks for room."""
        chain = self._chain(tokens)
        self._touch(chain)  # last in line for eviction while the new blocks go in
        whole = len(tokens) // self.block
        room = len(self.free) + len(self.blocks) - len(chain)
        new = min(whole - len(chain), room)
        if new <= 0:
            return
        slots = [self._allocate() for _ in range(new)]
        start, end = len(chain) * self.block, (len(chain) + new) * self.block
        index = torch.tensor(slots, device=self.k[0].device)
        for c, k, v in zip(self.rows, self.k, self.v, strict=True):
            nkv, hs = k.shape[1], k.shape[3]
            # [nkv, new*block, hs] -> [nkv, new, block, hs] -> [new, nkv, block, hs]
            k[index] = c.k[row, :, start:end].reshape(nkv, new, self.block, hs).transpose(0, 1)
            v[index] = c.v[row, :, start:end].reshape(nkv, new, self.block, hs).transpose(0, 1)
        parent = chain[-1][1].serial if chain else 0
        for i, slot in enumerate(slots):
            first = start + i * self.block
            key = (parent, tuple(tokens[first : first + self.block]))
            block = Block(slot, next(self.serials))
            chain.append((key, block))
            parent = block.serial
        self._touch(chain)

    def _chain(self, tokens: list[int]) -> list[tuple[Key, Block]]:
        """The cached blocks that begin `tokens`, first to last."""
        chain, parent = [], 0
        for first in range(0, len(tokens) - self.block + 1, self.block):
            key = (parent, tuple(tokens[first : first + self.block]))
            block = self.blocks.get(key)
            if block is None:
                break
            chain.append((key, block))
            parent = block.serial
        return chain

    def _touch(self, chain: list[tuple[Key, Block]]) -> None:
        """Mark `chain` just used, its last block first: a block stays more recently used than
        every block that continues it, so the least recently used block is always a leaf."""
        for key, block in reversed(chain):
            self.blocks[key] = block
            self.blocks.move_to_end(key)

    def _allocate(self) -> int:
        """A free slot of the pool, evicting the least recently used block if none is."""
        if self.free:
            return self.free.pop()
        _, block = self.blocks.popitem(last=False)
        return block.slot
