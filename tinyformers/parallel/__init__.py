"""Tensor parallel on torch.distributed: one model split across processes and machines.

`tinyformers.load(..., tensor_parallel=True)` inside a process group (or the CLI under
`torchrun`) builds this rank's shard (shard.py), reads only its slices of the weights, puts
the all-reduces around it (layers.py), and then rank 0 drives while the others mirror each of
its calls (mirror.py). docs/distributed.md has the design, the commands and the cost model.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from tinyformers.errors import TinyformersError
from tinyformers.parallel.layers import Link, parallelize
from tinyformers.parallel.mirror import Driver, serve
from tinyformers.parallel.shard import Shard

__all__ = ["Driver", "Link", "Shard", "join", "launched", "start", "timeout_seconds"]


def launched() -> bool:
    """True in a process that torchrun (or a launcher like it) started as one of several."""
    return os.environ.get("WORLD_SIZE", "1").isdigit() and int(os.environ["WORLD_SIZE"]) > 1


def timeout_seconds() -> float:
    """How long a rank waits for the others before it gives up: TINYFORMERS_TP_TIMEOUT, else 60."""
    value = os.environ.get("TINYFORMERS_TP_TIMEOUT", "60")
    try:
        return max(1.0, float(value))
    except ValueError:
        raise TinyformersError(f"TINYFORMERS_TP_TIMEOUT={value!r}: expected seconds") from None


_joined = 0  # models this process has loaded under tensor parallel


def join(device: torch.device) -> tuple[Shard, Link]:
    """This process's shard and the model's own group of every rank (layers.Link) with our
    timeout. The default process group is initialized here from torchrun's environment unless
    the caller did it (a script may destroy it at its end, as PyTorch asks); the model's group
    meets over its store. Backend: gloo for the CPU, NCCL for CUDA."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timeout_seconds()
    if not dist.is_initialized():
        needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        missing = [name for name in needed if name not in os.environ]
        if missing:
            raise TinyformersError(
                "tensor parallel needs an initialized process group, or torchrun's environment "
                f"(no {', '.join(missing)}): run under `torchrun --nproc-per-node N`"
            )
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    global _joined
    try:
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        rank, world = dist.get_rank(), dist.get_world_size()
        # A new prefix for each model loaded in this process: every rank loads them in the
        # same order, so the keys agree, and a closed model's keys are never read again.
        _joined += 1
        # The default group's store (torchrun's, or the caller's init_method); private in
        # torch.distributed, but there since torch 1.8.
        store = dist.distributed_c10d._get_default_store()
        link = Link(dist.PrefixStore(f"tinyformers/{_joined}", store), rank, world, timeout, device)
    except dist.DistError as e:  # a rank that never came (it failed first, or a wrong address)
        reason = str(e).strip().splitlines()[0][:200]
        raise TinyformersError(
            f"tensor parallel: the ranks did not all meet within {timeout:.0f} s "
            f"(TINYFORMERS_TP_TIMEOUT): {reason}"
        ) from None
    return Shard(rank, world), link


def start(net: nn.Module, shard: Shard, link: Link, config) -> nn.Module:
    """Put the communication around the shard `net`; on rank 0 return the network that drives
    the others, on the others serve rank 0's calls, then exit (SystemExit(0)) when it is done.
    `config` is the whole model's."""
    timeout = timeout_seconds()
    parallelize(net, shard, config.vocab_size, link)
    if shard.rank != 0:
        serve(net, link, timeout)
        raise SystemExit(0)
    driver = Driver(net, config, link, timeout)
    atexit.register(driver.stop)  # close() stops it sooner; at exit, a second stop is a no-op
    return driver
