"""The communication of a sharded model, put around its modules after loading (and packing).

The model files stay free of distribution: a row-parallel projection gets an all-reduce after
it, the embedding a masked lookup and an all-reduce, lm_head an all-gather of the logits.
Per decoded token: 2 all-reduces of (B, 1, C) per layer, one for the embedding, one
all-gather of (B, 1, V / world) for the logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from tinyformers.parallel.shard import ROW_PARALLEL, Shard


class LinkError(Exception):
    """A collective failed: a rank died, or one did not answer within the group's timeout."""


def collective(op, *args, **kwargs) -> None:
    """Run a torch.distributed collective; its failure raised as LinkError. gloo raises a
    plain RuntimeError, NCCL a DistBackendError: a failure inside the model (same inputs,
    same error on every rank) must not be mistaken for a lost rank, or the reverse."""
    try:
        op(*args, **kwargs)
    except RuntimeError as e:
        raise LinkError(str(e)) from e


class AllReduced(nn.Module):
    """A row-parallel projection: each rank's partial sum (B, T, C), added over the ranks."""

    def __init__(self, inner: nn.Module, group) -> None:
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, x: Tensor) -> Tensor:
        y = self.inner(x).contiguous()  # (B, T, C): this rank's heads' or units' share
        collective(dist.all_reduce, y, group=self.group)  # the sum over every rank's share
        return y


class VocabParallelEmbedding(nn.Module):
    """Token vectors from rows split by id: the rank holding a token's row gives its vector,
    the others zeros, and an all-reduce adds them (each vector is exact: x + 0 + 0)."""

    def __init__(self, inner: nn.Module, start: int, rows: int, group) -> None:
        super().__init__()
        self.inner, self.start, self.rows, self.group = inner, start, rows, group

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.start  # (B, T): the row of each id in this rank's shard
        mine = (local >= 0) & (local < self.rows)
        x = self.inner(local.clamp(0, self.rows - 1))  # (B, T, C)
        x = torch.where(mine[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        collective(dist.all_reduce, x, group=self.group)
        return x


class GatheredLogits(nn.Module):
    """lm_head on rows split by id: each rank's logits (B, T, ceil(V / world)), the last rank's
    padded to that, gathered side by side on every rank, the padding cut off: (B, T, V)."""

    def __init__(self, inner: nn.Module, vocab_size: int, world: int, group) -> None:
        super().__init__()
        self.inner, self.vocab_size, self.world, self.group = inner, vocab_size, world, group
        self.rows = -(-vocab_size // world)

    def forward(self, x: Tensor) -> Tensor:
        local = self.inner(x)  # (B, T, rows of this rank)
        local = F.pad(local, (0, self.rows - local.shape[-1])).contiguous()  # all_gather: equal
        parts = [torch.empty_like(local) for _ in range(self.world)]
        collective(dist.all_gather, parts, local, group=self.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]  # (B, T, V)


def parallelize(net: nn.Module, shard: Shard, vocab_size: int, group) -> nn.Module:
    """Put the communication around `net`'s sharded modules (names as shard.py splits them)."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if name in ROW_PARALLEL:
                setattr(parent, name, AllReduced(child, group))
            elif name in ("wte", "embed_tokens"):
                start, stop = shard.vocab_span(vocab_size)
                setattr(parent, name, VocabParallelEmbedding(child, start, stop - start, group))
            elif name == "lm_head":
                setattr(parent, name, GatheredLogits(child, vocab_size, shard.world, group))
    return net
