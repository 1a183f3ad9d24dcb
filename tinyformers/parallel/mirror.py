"""Rank 0 drives, the other ranks mirror: every call on rank 0's network is sent to them first.

So `generate`, `stream`, `chat` and `serve` run unchanged on rank 0: each `make_cache` and
forward (ids, mask, the cache rows and slots, input_pos) goes out as one broadcast, every rank
runs it on its shard (meeting at the same all-reduces), and only rank 0 uses the logits. Rank
0 samples every token, so the other ranks never decide anything.

A message is a header of HEADER int64s, then one int64 payload: ids, mask, input_pos, and the
ids of caches rank 0 has freed. While rank 0 is idle (a chat waiting for a message, a server
for a request), a heartbeat every timeout / 4 keeps the others from timing out; a rank that dies
or hangs makes the next collective fail within the timeout, and then every rank exits.

Rank 0 says STOP when its process exits (or at `close()`), over the model's own group
(layers.Link), so the others exit 0 even after a script's `dist.destroy_process_group()`.
TINYFORMERS_TP_TIMES=FOLDER makes each rank write its time per collective there as it ends.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref

import torch
from torch import Tensor, nn

from tinyformers.errors import TinyformersError
from tinyformers.models.kv_cache import KVCache
from tinyformers.parallel.layers import Link, LinkError

FORWARD, MAKE_CACHE, HEARTBEAT, STOP = 1, 2, 3, 4
# Header fields, by position. A view of a cache (the server's rows and slots) is sent as its
# storage offset, shape and strides, the same on every rank (every rank's cache has one shape).
OP, PAYLOAD, CACHE, B, T, MASK_COLS, POS_ROWS, POS_COLS, LAST_ONLY, FREED, OFFSET = range(11)
SHAPE, STRIDE, COMPILED, HEADER = slice(11, 15), slice(15, 19), 19, 20


def fatal(error: BaseException, rank: int, timeout: float) -> None:
    """One line on stderr, then exit 1 at once: a process group that lost a rank cannot run
    another collective, and other threads (a server's) must not keep this process up."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    print(
        f"tinyformers: error: tensor parallel: rank {rank} lost contact with the others (a rank "
        f"died, or did not answer within {timeout:.0f} s): {reason}",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(1)


class Driver(nn.Module):
    """Rank 0's network: the shard, with each call sent to the other ranks before it runs.

    `config` is the whole model's (what generation and the tokenizer see); the shard's own,
    with its share of the heads, stays on `net.config`.
    """

    def __init__(self, net: nn.Module, config, link: Link, timeout: float) -> None:
        super().__init__()
        self.net, self.config, self.link, self.timeout = net, config, link, timeout
        self.world = link.world
        self.lock = threading.Lock()  # one message (and the collectives it starts) at a time
        self.caches: dict[int, int] = {}  # storage address of a cache's layer 0 keys -> its id
        self.freed: list[int] = []  # ids of caches garbage-collected here, to free there too
        self.next_id, self.last_sent, self.stopped = 0, time.monotonic(), False
        threading.Thread(target=self._heartbeat, name="tinyformers-tp", daemon=True).start()

    @property
    def hooks(self):
        raise TinyformersError(
            "activation hooks (run_with_cache, run_with_hooks, logit_lens, explain) do not run "
            "under tensor parallel: each rank holds only some heads"
        )

    def compiled(self) -> nn.Module:
        """The network for decode steps under torch.compile: each rank runs its shard compiled
        (torch.compile's graphs between the collectives), the header telling the others so."""
        return Compiled(self)

    def make_cache(self, batch: int, max_len: int) -> list[KVCache]:
        with self.lock:
            self._check_open()
            cache_id, self.next_id = self.next_id, self.next_id + 1
            self._send([MAKE_CACHE, 0, cache_id, batch, max_len])
            cache = self.net.make_cache(batch, max_len)
        address = cache[0].k.untyped_storage().data_ptr()
        self.caches[address] = cache_id
        weakref.finalize(cache[0], self._free, address, cache_id)
        return cache

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        cache: list[KVCache] | None = None,
        input_pos: Tensor | None = None,
        last_only: bool = False,
        compiled: nn.Module | None = None,
    ) -> Tensor:
        """The logits of the whole model; the same call runs first on every other rank.
        `compiled`: the shard under torch.compile, run in place of the shard (decode steps)."""
        header = [0] * HEADER
        header[OP], header[B], header[T] = FORWARD, *input_ids.shape
        header[LAST_ONLY], header[CACHE], header[MASK_COLS] = int(last_only), -1, -1
        header[COMPILED] = int(compiled is not None)
        payload = [input_ids]
        if attention_mask is not None:
            header[MASK_COLS] = attention_mask.shape[1]
            payload.append(attention_mask)
        if input_pos is not None:
            header[POS_ROWS] = input_pos.shape[0] if input_pos.dim() == 2 else 0
            header[POS_COLS] = input_pos.shape[-1]
            payload.append(input_pos)
        else:
            header[POS_COLS] = -1
        if cache is not None:
            k = cache[0].k  # the whole cache, or a view of some rows and slots (the server)
            header[CACHE] = self.caches[k.untyped_storage().data_ptr()]
            header[OFFSET], header[SHAPE], header[STRIDE] = k.storage_offset(), k.shape, k.stride()
        net = self.net if compiled is None else compiled
        with self.lock:
            self._check_open()
            freed, self.freed = self.freed, []
            header[FREED] = len(freed)
            self.link.phase = "decode" if input_ids.shape[1] == 1 else "prefill"
            self._send(header, [*payload, torch.tensor(freed, dtype=torch.long)])
            try:
                with self.link.step(input_ids.shape[1]):
                    return net(
                        input_ids,
                        attention_mask,
                        cache=cache,
                        input_pos=input_pos,
                        last_only=last_only,
                    )
            except LinkError as e:
                fatal(e, 0, self.timeout)

    def stop(self) -> None:
        """Tell the other ranks to exit: at `LanguageModel.close()`, else at rank 0's exit.
        Calls after it raise an error; stopping again does nothing."""
        with self.lock:
            if not self.stopped:
                self._send([STOP])
                self.stopped = True
                if folder := os.environ.get("TINYFORMERS_TP_TIMES"):
                    self.link.save_times(folder)

    def _check_open(self) -> None:
        if self.stopped:
            raise TinyformersError(
                "tensor parallel: this model was closed (its other ranks have exited)"
            )

    def _send(self, header: list[int], payload: list[Tensor] = ()) -> None:
        flat = torch.cat([t.reshape(-1).long().cpu() for t in payload] or [torch.zeros(0).long()])
        header = list(header) + [0] * (HEADER - len(header))
        header[PAYLOAD] = flat.numel()
        try:
            self.link.broadcast(torch.tensor(header).to(self.link.device))
            if flat.numel():
                self.link.broadcast(flat.to(self.link.device))
        except LinkError as e:
            fatal(e, 0, self.timeout)
        self.last_sent = time.monotonic()

    def _free(self, address: int, cache_id: int) -> None:
        self.caches.pop(address, None)
        self.freed.append(cache_id)

    def _heartbeat(self) -> None:
        while not self.stopped:
            time.sleep(self.timeout / 8)
            if time.monotonic() - self.last_sent > self.timeout / 4 and self.lock.acquire(False):
                try:
                    if not self.stopped:
                        self._send([HEARTBEAT])
                finally:
                    self.lock.release()


class Compiled(nn.Module):
    """Rank 0's decode steps under torch.compile (`Driver.compiled`): a separate module, so
    generation tells the compiled steps apart (it times their first, compiling, step alone)."""

    def __init__(self, driver: Driver) -> None:
        super().__init__()
        driver.link.compiling()
        self.driver, self.net = driver, torch.compile(driver.net, dynamic=True)

    def forward(self, *args, **kwargs) -> Tensor:
        return self.driver(*args, **kwargs, compiled=self.net)


def serve(net: nn.Module, link: Link, timeout: float) -> None:
    """The other ranks: run each call rank 0 sends on this rank's shard, until it says stop."""
    caches: dict[int, list[KVCache]] = {}
    nets = {0: net}  # by header[COMPILED]: the shard, and under torch.compile once asked for
    with torch.inference_mode():
        while True:
            try:
                link.phase = "wait"  # filed under the phase of the step it was waiting for
                header = torch.empty(HEADER, dtype=torch.long, device=link.device)
                link.broadcast(header)
                header = header.tolist()
                flat = torch.empty(header[PAYLOAD], dtype=torch.long, device=link.device)
                if flat.numel():
                    link.broadcast(flat)
                if header[OP] == STOP:
                    if folder := os.environ.get("TINYFORMERS_TP_TIMES"):
                        link.save_times(folder)
                    return
                if header[OP] == MAKE_CACHE:
                    caches[header[CACHE]] = net.make_cache(header[B], header[T])
                elif header[OP] == FORWARD:
                    link.refile("wait", "decode" if header[T] == 1 else "prefill")
                    if header[COMPILED] and 1 not in nets:
                        link.compiling()
                        nets[1] = torch.compile(net, dynamic=True)
                    with link.step(header[T]):
                        _forward(nets[header[COMPILED]], header, flat, caches)
            except LinkError as e:
                fatal(e, link.rank, timeout)
            except Exception:  # noqa: S110  rank 0 met the same error (same call) and reports it
                pass


def _forward(net: nn.Module, header: list[int], flat: Tensor, caches: dict) -> None:
    """Rank 0's forward, on this shard; the logits go nowhere (rank 0 has the same ones)."""
    parts = [header[B] * header[T]]
    parts.append(header[B] * header[MASK_COLS] if header[MASK_COLS] >= 0 else 0)
    parts.append(max(header[POS_ROWS], 1) * header[POS_COLS] if header[POS_COLS] >= 0 else 0)
    ids, mask, pos, freed = flat.split([*parts, header[FREED]])
    for cache_id in freed.tolist():
        caches.pop(cache_id, None)
    ids = ids.view(header[B], header[T])
    mask = mask.view(header[B], -1) if header[MASK_COLS] >= 0 else None
    if header[POS_COLS] < 0:
        pos = None
    elif header[POS_ROWS]:
        pos = pos.view(header[POS_ROWS], -1)
    cache = None
    if header[CACHE] >= 0:
        shape, stride, offset = header[SHAPE], header[STRIDE], header[OFFSET]
        cache = [_view(c, shape, stride, offset) for c in caches[header[CACHE]]]
    net(ids, mask, cache=cache, input_pos=pos, last_only=bool(header[LAST_ONLY]))


def _view(cache: KVCache, shape, stride, offset) -> KVCache:
    """The same rows and slots of this rank's cache as rank 0's view of its own."""
    view = KVCache.__new__(KVCache)
    nn.Module.__init__(view)
    for name in ("k", "v"):
        whole = getattr(cache, name)
        view.register_buffer(name, whole.as_strided(shape, stride, offset), persistent=False)
    return view
