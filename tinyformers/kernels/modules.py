"""Put a loaded model on the kernels: every nn.Linear becomes a PackedLinear.

Projections that read the same input (q, k, v; gate, up) are stacked into one packed matrix,
and the model's own names for them become `RowSlice`s of it, so the model file's lines run
unchanged and the stacked matmul runs once per input. Then the fused modules are swapped in
(swap.py). A tied input embedding (GPT-2's wte, SmolLM2's embed_tokens) reads its rows from
the packed lm_head, so the model keeps one copy of that matrix, as before packing. Passes of
more than `fused.ATTEND_ROWS` rows (prefill) run torch's matmul instead where it measured
faster at load (choose.py); only those weights keep a second, dense copy.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor, nn

from .choose import Choice, choose, mode, torch_linear
from .fused import ATTEND_ROWS
from .packed import PackedWeight, linear, pack, pack_quantized
from .swap import swap_in

# name of the stacked matrix -> the projections stacked in it, by rows, in this order
STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class PackedLinear(nn.Module):
    """nn.Linear with its weight in a kernel layout (packed.FORMATS);
    `weight.dense()` gives the [out, in] matrix back, as the kernel sees it.

    `prefill` is the kernel chosen at load for passes of more than ATTEND_ROWS rows (None:
    no choice made, `linear` decides); where it is torch's, `torch_weight` holds the weight
    in torch's layout (a buffer, moved by `.to()`, left out of the state_dict)."""

    def __init__(self, weight: PackedWeight, bias: Tensor | None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = weight.k, weight.n
        self.prefill: Choice | None = None
        self.register_buffer("torch_weight", None, persistent=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def forward(self, x: Tensor) -> Tensor:
        dense = self._buffers["torch_weight"]  # a dict read: this runs ~200 times a token
        if dense is not None and x.is_cpu and x.numel() > ATTEND_ROWS * self.in_features:
            return torch_linear(x, dense, self.bias)  # prefill, where torch's won at load
        return linear(x, self.weight, self.bias)


class Stacked:
    """A stacked PackedLinear and the sizes of its parts: the first part asked for runs the
    matmul for all of them, the others are handed out from it (one pass over x, as before the
    split). Not a module: the PackedLinear is registered once, under its stacked name."""

    def __init__(self, linear: PackedLinear, sizes: list[int]) -> None:
        self.linear, self.sizes = linear, sizes
        self._input: Tensor | None = None
        self._parts: list[Tensor | None] = []

    def part(self, x: Tensor, i: int) -> Tensor:
        """Part i of linear(x) on the last dim (a view): x [..., K] -> [..., sizes[i]]."""
        if self._input is not x or self._parts[i] is None:
            self._input, self._parts = x, list(self.linear(x).split(self.sizes, dim=-1))
        y, self._parts[i] = self._parts[i], None
        if all(p is None for p in self._parts):  # every part handed out: hold nothing
            self._input = None
        return y


class RowSlice(nn.Module):
    """One projection of a stacked matrix, under its own name (q_proj, k_proj, ...): rows
    `start:stop` of the stacked output."""

    def __init__(self, stacked: Stacked, i: int) -> None:
        super().__init__()
        self.stacked, self.i = stacked, i
        start = sum(stacked.sizes[:i])
        self.rows = slice(start, start + stacked.sizes[i])

    def extra_repr(self) -> str:
        return f"rows {self.rows.start}:{self.rows.stop} of the stacked matrix"

    def forward(self, x: Tensor) -> Tensor:
        return self.stacked.part(x, self.i)


class PackedEmbedding(nn.Module):
    """Embedding lookup from a PackedWeight [V, C]: row i of the matrix is token i's vector."""

    def __init__(self, weight: PackedWeight) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.weight.rows(ids)  # (..., C) float32


def pack_model(net: nn.Module, fmt: str, quantized: dict[str, tuple] | None = None) -> nn.Module:
    """Replace every nn.Linear of `net` by a PackedLinear in `fmt` ("f32", "bf16", "int8"),
    and a tied embedding by a PackedEmbedding over the same packed matrix.

    `quantized` gives a GGUF file's own blocks by module name, as (ggml type name, then the
    values, scales[, mins] `pack_quantized` takes): those are packed as stored, never
    requantised. The projections
    of a `STACKED` group (q, k, v; gate, up) are stacked into one packed matrix, so one pass
    over x computes them all, and each keeps its name as a `RowSlice`; a group whose members
    are not all of one kind (a GGUF mixing Q8_0 and Q4 blocks) stays apart.

    Everything else (norms, biases, position embeddings, so activations and the KV cache)
    becomes float32: the kernels compute in float32 anyway, these tensors are a few percent of
    the bytes, and torch's CPU attention is several times slower in bfloat16.

    Last, each PackedLinear's prefill kernel is chosen (`choose_prefill`), and the fused
    modules are swapped in (`swap.swap_in`).
    """
    how = mode()  # checked first: a bad TINYFORMERS_PREFILL fails before seconds of packing
    quantized = quantized or {}
    embedding_of = {  # the matrix of each embedding -> where the embedding sits
        m.weight.data_ptr(): (parent, name, f"{parent_name}.{name}".lstrip("."))
        for parent_name, parent in net.named_modules()
        for name, m in parent.named_children()
        if isinstance(m, nn.Embedding)
    }
    # (parent, packed name, member names) triples, not the modules: holding the old Linears
    # would keep every dense weight alive until the end, two copies of the model at the peak.
    jobs = []
    for parent_name, parent in net.named_modules():
        prefix = f"{parent_name}.".lstrip(".")
        grouped: set[str] = set()
        for stacked, members in STACKED.items():
            kinds = {_kind(getattr(parent, m, None), quantized.get(prefix + m)) for m in members}
            if len(kinds) == 1 and None not in kinds:
                jobs.append((parent, prefix, stacked, members))
                grouped.update(members)
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and name not in grouped:
                jobs.append((parent, prefix, name, (name,)))
    # Largest first: while the big lm_head is packed, nothing else has been freed yet, and the
    # smaller ones then reuse the memory freed behind them (peak: one copy of the lm_head).
    jobs.sort(key=lambda job: -sum(getattr(job[0], m).weight.numel() for m in job[3]))
    for parent, prefix, name, members in jobs:
        linears = [getattr(parent, m) for m in members]
        owner, attr, tied_name = embedding_of.get(linears[0].weight.data_ptr(), (None,) * 3)
        blocks = [quantized.get(prefix + m) or quantized.get(tied_name) for m in members]
        if blocks[0] is not None:  # (ggml type, values, scales[, mins]) stacked part by part
            parts = zip(*(b[1:] for b in blocks), strict=True)
            packed = pack_quantized(*(_rows(p) for p in parts), ggml_type=blocks[0][0])
        else:
            packed = pack(_rows([lin.weight.detach() for lin in linears]), fmt)
        if owner is not None:  # the same matrix: lm_head = wte
            setattr(owner, attr, PackedEmbedding(packed))
        biases = [lin.bias for lin in linears]
        bias = None if biases[0] is None else _rows([b.detach() for b in biases])
        sizes = [lin.out_features for lin in linears]
        for m in members:
            delattr(parent, m)
        setattr(parent, name, PackedLinear(packed, bias))
        if len(members) > 1:
            stacked = Stacked(getattr(parent, name), sizes)
            for i, m in enumerate(members):
                setattr(parent, m, RowSlice(stacked, i))
        del linears, biases
        _return_freed_memory()
    for p in net.parameters():
        p.data = p.data.float()
    reuse_freed_memory()  # before the timings below, which should see what a prefill will
    choose_prefill([m for m in net.modules() if isinstance(m, PackedLinear)], how)
    return swap_in(net)


def choose_prefill(linears: list[PackedLinear], how: str) -> None:
    """Choose the prefill kernel of each distinct (format, N, K) once (choose.py: timed when
    `how` is "measure") for every weight of that shape; where torch's wins, keep the weight
    dense in torch's layout too.

    Chosen here at load, not lazily at the first prefill: the timing (~0.1 s for SmolLM2) and
    the dense copies' memory are settled before `load` returns, never inside a timed first
    prompt or a torch.compile trace.
    """
    choices: dict[tuple[str, int, int], Choice | None] = {}
    for lin in linears:
        w = lin.weight
        key = (w.fmt, w.n, w.k)
        if key not in choices:
            choices[key] = choose(w, how)
        lin.prefill = choices[key]
        if lin.prefill is not None and lin.prefill.kernel == "torch":
            lin.torch_weight = w.unpacked()  # the same values, in torch's [N, K] layout


def prefill_kernels(net: nn.Module) -> str | None:
    """Which matmul runs the passes of more than ATTEND_ROWS rows, by shape: for `info()`.

    Example: "ours on bf16 960x576, 576x576 (measured at load, 128 rows: ours 1.0 ms, torch
    1.1 ms in all); decode (<= 16 rows): ours"
    """
    groups: dict[tuple[str, str, str], dict[str, Choice]] = {}
    for m in net.modules():
        if isinstance(m, PackedLinear) and m.prefill is not None:
            w, c = m.weight, m.prefill
            groups.setdefault((c.kernel, c.why, w.fmt), {})[f"{w.n}x{w.k}"] = c
    if not groups:
        return None
    parts = []
    for (kernel, why, fmt), shapes in groups.items():
        name = "torch F.linear" if kernel == "torch" else "ours"
        timed = [c for c in shapes.values() if c.ours_ms is not None]
        ours_ms, torch_ms = sum(c.ours_ms for c in timed), sum(c.torch_ms for c in timed)
        times = f": ours {ours_ms:.1f} ms, torch {torch_ms:.1f} ms in all" if timed else ""
        parts.append(f"{name} on {fmt} {', '.join(shapes)} ({why}{times})")
    return "; ".join(parts) + f"; decode (<= {ATTEND_ROWS} rows): ours"


def _kind(linear: nn.Module | None, blocks: tuple | None) -> tuple | None:
    """What must agree for matrices to stack: being a Linear, bias or not, and the block
    type (Q8_0 and Q4_K blocks cannot share a matrix)."""
    if not isinstance(linear, nn.Linear):
        return None
    return linear.bias is None, None if blocks is None else blocks[0]


def _rows(tensors: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """The tensors stacked by rows (one tensor as it is, without a copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


@functools.cache
def _libc_function(name: str):
    """A glibc function by name, or None (another C library, or none to load)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def reuse_freed_memory() -> None:
    """Let the process reuse the memory an op frees, rather than map it afresh for the next.

    subtle: glibc maps every allocation above its threshold (128 KB, rising to at most 32 MB)
    with mmap and unmaps it when freed, so each op of a long prefill page-faults its output in
    anew: a 6,000-token [T, 3072] float32 activation is 74 MB, 18k faults, and our bf16 matmul
    fell from ~390 to ~250 GFLOP/s at 6,000 rows (torch's too, 410 -> 340). With both
    thresholds at 1 GiB, freed blocks stay in the heap for the next op, as llama.cpp reuses
    one compute buffer; the peak RSS barely moves (SmolLM2 bf16, 6,000 tokens: +29 MB).
    """
    if mallopt := _libc_function("mallopt"):
        for param in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD):
            mallopt(param, 1 << 30)


def _return_freed_memory() -> None:
    """subtle: glibc keeps freed heap memory for reuse, and the packed copies are allocated
    before the dense weights they replace are freed, so without handing the freed memory back
    RSS would grow towards both layouts of every matrix."""
    if trim := _libc_function("malloc_trim"):
        trim(0)
