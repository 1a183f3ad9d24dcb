"""The communication of a sharded model, put around its modules after loading (and packing).

The model files stay free of distribution: a row-parallel projection gets an all-reduce after
it, the embedding a masked lookup and an all-reduce, lm_head an all-gather of the logits.
Per decoded token: 2 all-reduces of (B, 1, C) per layer, one for the embedding, one
all-gather of (B, 1, V / world) for the logits.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from tinyformers.parallel.shard import ROW_PARALLEL, Shard


class LinkError(Exception):
    """A collective failed: a rank died, or one did not answer within the group's timeout."""


class Link:
    """The model's own process group over `store`, and the time spent in each collective.

    subtle: the group is created here, not with `dist.new_group`, so torch.distributed does not
    know it: a script that ends with `dist.destroy_process_group()` (as PyTorch asks) does not
    shut it down, and rank 0 can still tell the others to stop when it exits afterwards.

    `seconds[(phase, kind)]` and `calls[(phase, kind)]` add up each collective (all-reduce,
    all-gather, broadcast) and each forward (`step`) by phase: "decode" for one-token steps,
    "prefill" otherwise. A collective's time includes its wait for the slowest rank, so on the
    ranks that mirror rank 0 the broadcast is mostly the wait while rank 0 samples.
    """

    def __init__(self, store, rank: int, world: int, timeout: float, device: torch.device):
        self.rank, self.world, self.device = rank, world, device
        after = timedelta(seconds=timeout)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = after
            self.group = dist.ProcessGroupNCCL(store, rank, world, options)
        else:
            self.group = dist.ProcessGroupGloo(store, rank, world, _gloo_options(after))
        self.held: tuple = ()  # the last collective's tensors and work (see _gloo_options)
        self.phase = "prefill"
        self.seconds: Counter[tuple[str, str]] = Counter()
        self.calls: Counter[tuple[str, str]] = Counter()

    @contextmanager
    def step(self, tokens: int) -> Iterator[None]:
        """Time a forward of `tokens` positions per row, and file its collectives by phase."""
        self.phase = "decode" if tokens == 1 else "prefill"
        start = time.perf_counter()
        yield
        self.seconds[self.phase, "forward"] += time.perf_counter() - start
        self.calls[self.phase, "forward"] += 1

    def refile(self, old: str, new: str) -> None:
        """Move what was filed under phase `old` to phase `new` (a message's wait, known to
        have been for a decode step only once the message came)."""
        for key in [key for key in self.seconds if key[0] == old]:
            self.seconds[new, key[1]] += self.seconds.pop(key)
            self.calls[new, key[1]] += self.calls.pop(key)

    def save_times(self, folder: str) -> None:
        """Write `folder`/rank{rank}.json: {phase: {kind: [calls, seconds]}}."""
        times: dict[str, dict[str, list]] = {}
        for (phase, kind), seconds in sorted(self.seconds.items()):
            times.setdefault(phase, {})[kind] = [self.calls[phase, kind], seconds]
        Path(folder, f"rank{self.rank}.json").write_text(json.dumps(times))

    def all_reduce(self, t: Tensor) -> None:
        """t = the sum of every rank's t, in place."""
        self._run("all-reduce", self.group.allreduce, [t])

    def all_gather(self, parts: list[Tensor], t: Tensor) -> None:
        """parts[r] = rank r's t, on every rank."""
        self._run("all-gather", self.group.allgather, [parts], [t])

    def broadcast(self, t: Tensor) -> None:
        """t = rank 0's t, on every rank."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self._run("broadcast", self.group.broadcast, [t], options)

    def compiling(self) -> None:
        """Before torch.compile traces the shard: make each collective a graph break of its
        own, the layers between them compiled. Done only then, as it imports torch._dynamo
        (150 MB)."""
        self._run = torch.compiler.disable(self._run)

    def _run(self, kind: str, op, *args) -> None:
        start = time.perf_counter()
        try:
            work = op(*args)
            self.held = (args, work)
            work.wait()
        except RuntimeError as e:  # gloo raises RuntimeError, NCCL its subclass DistBackendError
            raise LinkError(str(e)) from e
        self.seconds[self.phase, kind] += time.perf_counter() - start
        self.calls[self.phase, kind] += 1


def _gloo_options(timeout: timedelta) -> dist.ProcessGroupGloo._Options:
    """gloo's options: our timeout, the interfaces GLOO_SOCKET_IFNAME names (else the one the
    host name resolves to), and one worker thread.

    subtle: a worker thread drops its reference to a collective's tensors just after the call
    returns; where that reference is the last, it must take the GIL, and a thread that tries
    once the interpreter finalizes aborts the process ("terminate called without an active
    exception"). With one worker, each collective's references are gone before the next one
    runs, and `Link.held` keeps the last one's (the STOP message, and its work) alive to the
    end. Our collectives run one at a time anyway, so a second worker would sit idle."""
    options = dist.ProcessGroupGloo._Options()
    options._timeout, options._threads = timeout, 1
    names = [name for name in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if name]
    gloo = dist.ProcessGroupGloo
    options._devices = [gloo.create_device(interface=n) for n in names] or [
        gloo.create_default_device()
    ]
    return options


class AllReduced(nn.Module):
    """A row-parallel projection: each rank's partial sum (B, T, C), added over the ranks."""

    def __init__(self, inner: nn.Module, link: Link) -> None:
        super().__init__()
        self.inner, self.link = inner, link

    def forward(self, x: Tensor) -> Tensor:
        y = self.inner(x).contiguous()  # (B, T, C): this rank's heads' or units' share
        self.link.all_reduce(y)  # the sum over every rank's share
        return y


class VocabParallelEmbedding(nn.Module):
    """Token vectors from rows split by id: the rank holding a token's row gives its vector,
    the others zeros, and an all-reduce adds them (each vector is exact: x + 0 + 0)."""

    def __init__(self, inner: nn.Module, start: int, rows: int, link: Link) -> None:
        super().__init__()
        self.inner, self.start, self.rows, self.link = inner, start, rows, link

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.start  # (B, T): the row of each id in this rank's shard
        mine = (local >= 0) & (local < self.rows)
        x = self.inner(local.clamp(0, self.rows - 1))  # (B, T, C)
        x = torch.where(mine[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        self.link.all_reduce(x)
        return x


class GatheredLogits(nn.Module):
    """lm_head on rows split by id: each rank's logits (B, T, ceil(V / world)), the last rank's
    padded to that, gathered side by side on every rank, the padding cut off: (B, T, V)."""

    def __init__(self, inner: nn.Module, vocab_size: int, link: Link) -> None:
        super().__init__()
        self.inner, self.vocab_size, self.link = inner, vocab_size, link
        self.rows = -(-vocab_size // link.world)

    def forward(self, x: Tensor) -> Tensor:
        local = self.inner(x)  # (B, T, rows of this rank)
        local = F.pad(local, (0, self.rows - local.shape[-1])).contiguous()  # all_gather: equal
        parts = [torch.empty_like(local) for _ in range(self.link.world)]
        self.link.all_gather(parts, local)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]  # (B, T, V)


def parallelize(net: nn.Module, shard: Shard, vocab_size: int, link: Link) -> nn.Module:
    """Put the communication around `net`'s sharded modules (names as shard.py splits them)."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if name in ROW_PARALLEL:
                setattr(parent, name, AllReduced(child, link))
            elif name in ("wte", "embed_tokens"):
                start, stop = shard.vocab_span(vocab_size)
                setattr(parent, name, VocabParallelEmbedding(child, start, stop - start, link))
            elif name == "lm_head":
                setattr(parent, name, GatheredLogits(child, vocab_size, link))
    return net
