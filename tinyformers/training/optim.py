"""How a gradient becomes a step: the learning-rate schedule, gradient clipping and AdamW.

The gradient says, for each weight, which way the loss goes up and how steeply; a step moves
every weight a little the other way. Plain gradient descent moves w by -lr * g. AdamW
(Loshchilov & Hutter, 2019; Adam: Kingma & Ba, 2015) instead keeps two running averages per
weight, of g (the direction, smoothed) and of g² (how large the gradients have been), and
steps by their ratio, so every weight moves about lr per step whatever the scale of its
gradient. Weight decay pulls each decayed weight a little toward 0 at every step.

Each update below is one line of the algorithm applied to every weight at once: the
weights live in one block of memory, as llm.c keeps them; tests/test_training.py checks it
against `torch.optim.AdamW`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

CHUNK = 2**20  # weights per pass of AdamW.step: 4 blocks x 4 MB, about a CPU's cache


def learning_rate(it: int, lr: float, min_lr: float, warmup_iters: int, decay_iters: int) -> float:
    """The learning rate at step `it`: a linear warm-up, then a cosine down to min_lr
    (nanoGPT's schedule). Warm-up keeps the first steps small while AdamW's averages of g²
    are still estimates from a few samples; decay lets the weights settle at the end.

    Example: learning_rate(0, 1e-3, 1e-4, 100, 2000) == 1e-3 * 1 / 101.
    """
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if it > decay_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, decay_iters - warmup_iters)  # 0 -> 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0 along half a cosine
    return min_lr + coeff * (lr - min_lr)


def clip_grad_norm(optimizer: AdamW, max_norm: float) -> Tensor:
    """Scale every gradient down so that their joint length is at most `max_norm` (0: never);
    returns the length before clipping, sqrt(sum of every g²).

    A rare huge gradient then moves the weights by a bounded step instead of throwing them
    far away.
    """
    total = torch.linalg.vector_norm(torch.stack([g.grad.norm() for g in optimizer.groups]))
    if max_norm > 0:
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)  # 1 when already short enough
        for group in optimizer.groups:
            group.grad.mul_(scale)
    return total


class Group:
    """The parameters of one weight-decay group in one block of memory, as llm.c keeps them:
    each parameter (and its .grad) is a view of `flat` (and `flat.grad`), so one AdamW line
    updates them all at once. m and v, AdamW's state, are blocks of the same shape."""

    def __init__(self, params: list[nn.Parameter], weight_decay: float) -> None:
        self.params, self.weight_decay = params, weight_decay
        like = params[0]
        total = sum(p.numel() for p in params)
        self.flat = torch.empty(total, dtype=like.dtype, device=like.device)  # every weight
        self.flat.grad = torch.zeros_like(self.flat)
        start = 0
        for p in params:  # from now on p is a window onto the block, its gradient too
            n = p.numel()
            self.flat[start : start + n].copy_(p.detach().reshape(-1))
            p.data = self.flat[start : start + n].view_as(p)  # its old memory is freed now
            # subtle: backward adds into an existing .grad in place, so it stays a view
            p.grad = self.flat.grad[start : start + n].view_as(p)
            start += n
        self.m = torch.zeros_like(self.flat)  # running mean of g
        self.v = torch.zeros_like(self.flat)  # running mean of g²

    @property
    def grad(self) -> Tensor:
        return self.flat.grad


class AdamW:
    """AdamW over `groups` of parameters, each group {"params": [...], "weight_decay": wd}.

    Its state is `m` and `v` per group and the step count, all tensors or numbers, so a
    checkpoint holds them exactly (`state_dict` / `load_state_dict`).
    """

    def __init__(
        self,
        groups: list[dict],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.groups = [Group(g["params"], g["weight_decay"]) for g in groups]
        self.lr, self.betas, self.eps = lr, betas, eps
        self.params = [p for g in self.groups for p in g.params]
        self.step_count = 0

    @torch.no_grad()
    def step(self) -> None:
        """Move every parameter by its AdamW step at the current `self.lr`."""
        self.step_count += 1
        beta1, beta2 = self.betas
        # m and v start at 0, so early on they are too small by (1 - beta^t): undo that
        bias1 = 1 - beta1**self.step_count
        bias2 = 1 - beta2**self.step_count
        for group in self.groups:
            # a slice of the blocks at a time: its four pieces stay in the cache for all lines
            for start in range(0, group.flat.numel(), CHUNK):
                part = slice(start, start + CHUNK)
                w, g, m, v = group.flat[part], group.grad[part], group.m[part], group.v[part]
                # decoupled weight decay: w <- w - lr * wd * w, apart from the gradient
                if group.weight_decay:
                    w.mul_(1 - self.lr * group.weight_decay)
                # m <- beta1 m + (1 - beta1) g: the gradient, smoothed over ~1/(1-beta1) steps
                m.lerp_(g, 1 - beta1)
                # v <- beta2 v + (1 - beta2) g²: the size of the gradient, smoothed likewise
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                # w <- w - lr * m̂ / (sqrt(v̂) + eps), with m̂ = m / bias1 and v̂ = v / bias2
                denom = (v.sqrt() / math.sqrt(bias2)).add_(self.eps)
                w.addcdiv_(m, denom, value=-self.lr / bias1)

    def zero_grad(self) -> None:
        for group in self.groups:
            group.grad.zero_()

    def state_dict(self) -> dict[str, Tensor]:
        """m and v of each group, and the step count (a checkpoint's optimizer file)."""
        state = {f"m.{i}": g.m for i, g in enumerate(self.groups)}
        state.update({f"v.{i}": g.v for i, g in enumerate(self.groups)})
        state["step"] = torch.tensor(self.step_count)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for i, group in enumerate(self.groups):
            for name in ("m", "v"):
                saved, mine = state[f"{name}.{i}"], getattr(group, name)
                if saved.shape != mine.shape:
                    raise ValueError(
                        f"optimizer state {name}.{i} has shape {tuple(saved.shape)}, "
                        f"the parameters {tuple(mine.shape)}"
                    )
                mine.copy_(saved)
        self.step_count = int(state["step"])


def parameter_groups(net: nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters in two groups: matrices (and embeddings) decay, while biases
    and norm weights (1-D) do not: pulling a norm's gain toward 0 would only shrink its
    output (nanoGPT's split). Tied tensors appear once."""
    params = [p for p in net.parameters() if p.requires_grad]  # parameters() dedups ties
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]  # LoRA has matrices only
