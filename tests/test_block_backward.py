"""The hand-written GPT-2 block backward (training/backward.py) against autograd (the reference)
on `Block` of models/gpt2.py, in float64."""

from __future__ import annotations

import pytest
import torch

from tinyformers.models.gpt2 import Block, GPT2Config
from tinyformers.models.hooks import Hooks
from tinyformers.models.masks import positions_and_mask
from tinyformers.training.backward import (
    block_backward,
    block_forward,
    layernorm_backward,
    layernorm_forward,
)

B, T, C, N_HEAD = 2, 5, 16, 4
# fp64 rounding through one block is ~1e-15; 1e-10 leaves room for any summation order and is
# far below what a wrong or missing term changes (test_gradients_are_far_from_zero).
TOL = 1e-10


@pytest.fixture
def block() -> Block:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=1, n_positions=T, n_embd=C, n_layer=1, n_head=N_HEAD)
    block = Block(config, 0, Hooks()).double().eval()
    with torch.no_grad():  # LayerNorm starts at weight 1, bias 0, which would hide their terms
        for ln in (block.ln_1, block.ln_2):
            ln.weight.copy_(1 + 0.5 * torch.randn(C))
            ln.bias.copy_(0.5 * torch.randn(C))
    # subtle: the written-out attention runs its softmax in float32 (`scores.float()`), which
    # caps fp64 agreement near 1e-7; SDPA computes the same equation in float64.
    block.attn.fast = True
    return block


def reference(block: Block, x: torch.Tensor, dout: torch.Tensor):
    """Block.forward's output, and autograd's dx and parameter gradients for `dout`."""
    x = x.clone().requires_grad_()
    input_pos = torch.arange(T)  # (T,): slots 0..T-1, no cache
    _, mask = positions_and_mask(None, input_pos, T, B)  # (B, 1, T, T): causal, no padding
    out = block(x, mask, None, input_pos)
    out.backward(dout)
    grads = {name: p.grad for name, p in block.named_parameters()}
    return out.detach(), x.grad, grads


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """x and a random dout: with dout all ones, LayerNorm's input gradient would cancel to 0."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, T, C, generator=g).double(), torch.randn(B, T, C, generator=g).double()


def test_forward_matches_block_forward(block):
    x, dout = inputs()
    ours, _ = block_forward(block, x)
    ref, _, _ = reference(block, x, dout)
    assert (ours - ref).abs().max().item() <= 1e-12  # fp64, Block.forward is the reference


def test_dx_and_every_parameter_gradient_match_autograd(block):
    x, dout = inputs()
    dx, grads = block_backward(block, x, dout)
    _, ref_dx, ref_grads = reference(block, x, dout)
    assert grads.keys() == ref_grads.keys()  # every parameter, under named_parameters()' names
    assert (dx - ref_dx).abs().max().item() <= TOL  # fp64, autograd through Block is the reference
    for name, grad in grads.items():
        assert grad.shape == ref_grads[name].shape, name
        assert (grad - ref_grads[name]).abs().max().item() <= TOL, name  # fp64, autograd


def test_gradients_are_far_from_zero(block):
    # The comparison above means something only if every gradient is much larger than TOL.
    x, dout = inputs()
    dx, grads = block_backward(block, x, dout)
    for name, grad in {"x": dx, **grads}.items():
        assert grad.abs().max().item() > 1e-3, name


def test_layernorm_mean_term_is_what_makes_dx_blind_to_a_shift(block):
    # Adding one number to every channel of a token leaves LayerNorm's output unchanged, so its
    # input gradient sums to 0 over C. The mean term is what makes it so: without it the sum
    # would be -C * rstd * mean(dout * weight), asserted here to be far above TOL.
    x, dout = inputs()
    weight, bias, eps = block.ln_1.weight.detach(), block.ln_1.bias.detach(), block.ln_1.eps
    _, mean, rstd = layernorm_forward(x, weight, bias, eps)  # (B, T, 1) each
    dx, _, _ = layernorm_backward(dout, x, weight, mean, rstd)  # (B, T, C)
    assert dx.sum(-1).abs().max().item() <= TOL  # fp64; exactly 0 in real numbers
    without_mean_term = C * rstd * (dout * weight).mean(-1, keepdim=True)  # (B, T, 1)
    assert without_mean_term.abs().min().item() > 1e-3
