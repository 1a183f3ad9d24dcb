"""The matmuls of training on the CPU: torch's own oneDNN GEMM where it beats `F.linear`.

A training step is three GEMMs per `nn.Linear`: y = x Wᵀ + b forward, then dx = dy W and
dW = dyᵀ x backward. `F.linear` runs them in MKL, which on an AMD EPYC takes its AVX2 code
(~100 GFLOP/s a core on Zen 5, measured) while oneDNN, also inside torch, runs AVX-512 there
(~240). On a Xeon MKL runs AVX-512 itself. So which one runs is measured per weight shape,
never assumed from a CPU name (docs/training.md has the figures).

`use_fast_matmuls(net, rows)` swaps each plain `nn.Linear` of `net` for `OneDNNLinear` where
the measurement says so: the same module, parameters and names, only the forward differs.
TINYFORMERS_TRAIN_MATMUL=measure (default), onednn or torch forces the choice.

Example:
    use_fast_matmuls(net, rows=batch_size * block_size)  # before building the optimizer
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import TinyformersError

MODES = ("measure", "onednn", "torch")
MARGIN = 1.1  # oneDNN must be this much faster: less is within a shared machine's noise
REPS = 5  # interleaved runs of each, best of: the first also builds oneDNN's primitives


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x Wᵀ + b through oneDNN: x [..., K], weight [N, K] (either may be a strided view)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def weight_grad(dy: Tensor, x: Tensor) -> Tensor:
    """dW = dyᵀ x through oneDNN: dy (M, N), x (M, K) -> (N, K)."""
    # oneDNN copies its first operand into a contiguous one: give it the narrower of the two
    if x.shape[1] < dy.shape[1]:
        return _onednn(x.t(), dy.t(), None).t()  # (xᵀ dy)ᵀ = dyᵀ x
    return _onednn(dy.t(), x.t(), None)  # (N, M) @ (M, K)


class _Linear(torch.autograd.Function):
    """y = x Wᵀ + b and its gradients, every GEMM through oneDNN."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)  # (..., K) -> (..., N)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight = ctx.saved_tensors
        dy = dy.contiguous()  # oneDNN runs a slow path on strided (say, expanded) operands
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _onednn(dy, weight.t(), None)  # dy W: (..., N) @ (N, K) -> (..., K)
        dy2 = dy.reshape(-1, dy.shape[-1])  # (M, N): every row of the batch
        if ctx.needs_input_grad[1]:
            dw = weight_grad(dy2, x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)  # (N,): the bias is added to every row
        return dx, dw, db


class OneDNNLinear(nn.Linear):
    """An `nn.Linear` whose three GEMMs run in oneDNN (set by `use_fast_matmuls`)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled():
            return super().forward(x)
        return _Linear.apply(x, self.weight, self.bias)


def mode() -> str:
    """TINYFORMERS_TRAIN_MATMUL, checked: "measure" (default), "onednn" or "torch"."""
    value = os.environ.get("TINYFORMERS_TRAIN_MATMUL", "measure")
    if value not in MODES:
        raise TinyformersError(
            f"TINYFORMERS_TRAIN_MATMUL={value!r}: expected measure, onednn or torch"
        )
    return value


def use_fast_matmuls(
    net: nn.Module, rows: int, choices: dict[str, str] | None = None
) -> dict[str, str]:
    """Swap each float32 CPU `nn.Linear` of `net` for `OneDNNLinear` where oneDNN's forward and
    backward on `rows` rows beat `F.linear`'s by MARGIN. Returns the choice per weight shape
    ("in x out": "onednn" or "torch"); `choices` from an earlier run are taken as they are,
    unmeasured (a resumed run must compute with the same kernels to get the same bits)."""
    how = mode()
    choices = dict(choices or {})
    for module in net.modules():
        if type(module) is not nn.Linear:  # a subclass (LoRA, packed) has its own forward
            continue
        w = module.weight
        if w.device.type != "cpu" or w.dtype != torch.float32 or not _has_onednn():
            continue
        shape = f"{module.in_features}x{module.out_features}"
        if shape not in choices:
            choices[shape] = how if how != "measure" else _measure(module, rows)
        if choices[shape] == "onednn":
            module.__class__ = OneDNNLinear
    return choices


def _has_onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _measure(module: nn.Linear, rows: int) -> str:
    """ "onednn" or "torch": the faster forward + backward of `module` on `rows` random rows."""
    random = torch.Generator().manual_seed(0)  # leaves torch's own generator untouched
    x = torch.randn(rows, module.in_features, generator=random, requires_grad=True)
    w = module.weight.detach().clone().requires_grad_(module.weight.requires_grad)
    b = None if module.bias is None else module.bias.detach().clone().requires_grad_()
    dy = torch.randn(rows, module.out_features, generator=random)  # from the layers above

    def run(linear) -> float:
        start = time.perf_counter()
        linear(x, w, b).backward(dy)
        return time.perf_counter() - start

    best = {"torch": float("inf"), "onednn": float("inf")}
    for _ in range(REPS):
        best["torch"] = min(best["torch"], run(F.linear))
        best["onednn"] = min(best["onednn"], run(_Linear.apply))
    return "onednn" if best["torch"] >= MARGIN * best["onednn"] else "torch"
