"""The loss of loss.py, computed the fast way: lm_head and cross-entropy together, a few rows
at a time, with the gradient worked out as it goes.

Written out (loss.py), the last step of a model makes logits for every position, (B, T, V):
for SmolLM2's vocabulary of 49,152 at 4 x 256 positions, 200 MB, then log-softmax makes 200 MB
more, and the backward pass two more such tensors. Yet the loss needs only two numbers per
position, log(sum(exp(logits))) and the target's logit, and the gradient of the mean loss
with respect to the logits is known in closed form: (softmax(logits) - onehot(target)) / count.
So here each chunk of rows makes its logits, takes those two numbers, turns the logits into
that gradient in place and multiplies it back through lm_head's weight, before the next chunk
reuses the memory (the "fused linear cross-entropy" of Liger-Kernel and others). The backward
pass then only scales the gradients found here. tests/test_training.py checks the loss and
both gradients against loss.py's written-out version with autograd.

The model's forward then hands on the final norm's output, not logits: `defer_head` swaps its
lm_head for `DeferredHead`, the same module (the same weight, the same name in checkpoints)
whose forward passes its input through.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyformers.kernels.train_linear import OneDNNLinear, _onednn, weight_grad
from tinyformers.training.loss import IGNORE

CHUNK_BYTES = 2**25  # logits per chunk: 32 MB, about what a CPU's last-level cache holds


class DeferredHead(nn.Linear):
    """lm_head while training: its weight stays (checkpoints see it), its forward passes the
    hidden states on, and `linear_cross_entropy` applies the weight in chunks."""

    onednn = False  # the GEMMs in oneDNN (the choice kernels/train_linear measured)

    def forward(self, x: Tensor) -> Tensor:
        return x


def defer_head(net: nn.Module) -> DeferredHead:
    """Make `net`'s forward return hidden states (B, T, C) in place of logits."""
    head = net.lm_head
    onednn = type(head) is OneDNNLinear
    head.__class__ = DeferredHead
    head.onednn = onednn
    return head


def linear_cross_entropy(hidden: Tensor, head: DeferredHead, targets: Tensor) -> Tensor:
    """cross_entropy(hidden @ head.weightᵀ, targets) of loss.py, chunk by chunk.

    hidden (B, T, C), targets (B, T) with IGNORE where not scored -> a scalar.
    """
    C = hidden.shape[-1]
    return _LinearCrossEntropy.apply(hidden.reshape(-1, C), head.weight, targets.reshape(-1),
                                     head.onednn)  # fmt: skip


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, onednn: bool) -> Tensor:
        N, V = h.shape[0], weight.shape[0]
        keep = targets != IGNORE  # (N,)
        count = keep.sum().clamp(min=1)
        rows = max(1, CHUNK_BYTES // (4 * V))
        total = torch.zeros((), device=h.device)
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None  # (N, C)
        dw = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        matmul = _onednn if onednn else F.linear
        for start in range(0, N, rows):
            part = slice(start, start + rows)
            hc, target, kept = h[part], targets[part].clamp(min=0), keep[part]
            logits = matmul(hc, weight, None).float()  # (n, C) @ (C, V) -> (n, V)
            lse = logits.logsumexp(dim=-1)  # (n,): log of the softmax's denominator
            picked = logits.gather(1, target[:, None]).squeeze(1)  # (n,): the target's logit
            total += ((lse - picked) * kept).sum()  # -log softmax(logits)[target], summed
            if dh is None and dw is None:
                continue
            # d mean loss / d logits = (softmax - onehot) / count, 0 on unscored rows
            grad = logits.sub_(lse[:, None]).exp_()  # (n, V): softmax, in the logits' memory
            grad.scatter_add_(1, target[:, None], grad.new_full((len(target), 1), -1.0))
            grad.mul_((kept / count)[:, None])
            grad = grad.to(h.dtype)
            if dh is not None:  # through lm_head back to the hidden states
                dh[part] = matmul(grad, weight.t(), None)  # (n, V) @ (V, C) -> (n, C)
            if dw is not None:  # and into lm_head's weight: (V, n) @ (n, C)
                dw += weight_grad(grad, hc) if onednn else grad.t() @ hc
        ctx.save_for_backward(dh, dw.to(weight.dtype) if dw is not None else None)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        dh, dw = ctx.saved_tensors
        return (
            dh * grad_loss if dh is not None else None,
            dw * grad_loss if dw is not None else None,
            None,
            None,
        )
