"""One GPT-2 block's forward and backward pass, written out by hand, op by op.

Reading material: training uses autograd (`loss.backward()`). This file shows what autograd
computes for one `Block` of models/gpt2.py, laid out as llm.c's `train_gpt2.c` is: each op's
backward beside its forward. tests/test_block_backward.py checks it against autograd.

The gradient of the loss L with respect to a tensor y, written dy, has y's shape; each entry
says how fast L changes when that entry of y is nudged. The chain rule carries it backwards:
if y = f(x) then dL/dx = dL/dy * dy/dx, so each `<op>_backward` receives `dout` (the gradient
of its output), applies its own local derivative, and returns its inputs' gradients. Where
one value feeds two paths, the chain rule adds the gradients that come back along each.

Shapes: B batch, T tokens, C = n_embd, nh = n_head, hs = head size (C // nh),
4C the MLP's inner width (n_inner).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tinyformers.models.gpt2 import ACTIVATIONS, Block

# LayerNorm --------------------------------------------------------------------------------------


def layernorm_forward(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(x - mean) / std * weight + bias per token; also the mean and 1/std the backward reads."""
    mean = x.mean(-1, keepdim=True)  # (B, T, 1)
    rstd = ((x - mean).pow(2).mean(-1, keepdim=True) + eps).rsqrt()  # (B, T, 1): 1 / std
    xhat = (x - mean) * rstd  # (B, T, C): mean 0, variance 1 per token
    return xhat * weight + bias, mean, rstd  # (B, T, C)


def layernorm_backward(
    dout: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """dx, dweight, dbias of layernorm_forward."""
    xhat = (x - mean) * rstd  # (B, T, C): recomputed, as cheap as storing it
    # weight and bias act on one channel of every token: their gradients add up that
    # channel's contributions over all B*T tokens.
    dweight = (dout * xhat).sum((0, 1))  # (C,): out = xhat * weight + bias
    dbias = dout.sum((0, 1))  # (C,): the bias passes dout through unchanged
    dxhat = dout * weight  # (B, T, C)
    # Each x_i reaches every xhat_j of its token along three paths; the chain rule adds them:
    # 1. directly, xhat_i = (x_i - mean) * rstd:                 + rstd * dxhat_i
    # 2. through the mean: x_i moves it by 1/C, which moves every xhat_j by -rstd/C:
    #                                                            - rstd * mean(dxhat)
    # 3. through the variance: x_i moves it by 2 (x_i - mean)/C, so rstd by -rstd^3 (x_i - mean)/C,
    #    and each xhat_j by (x_j - mean) times that:            - rstd * xhat_i * mean(dxhat * xhat)
    # Term 2 makes dx sum to 0 over C: adding one number to every x_i leaves xhat unchanged.
    mean_term = dxhat.mean(-1, keepdim=True)  # (B, T, 1)
    variance_term = xhat * (dxhat * xhat).mean(-1, keepdim=True)  # (B, T, C)
    dx = rstd * (dxhat - mean_term - variance_term)  # (B, T, C)
    return dx, dweight, dbias


# Matmul (nn.Linear) -----------------------------------------------------------------------------


def matmul_forward(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x @ weight^T + bias, as nn.Linear computes it: its weight is stored (out, in)."""
    return x @ weight.T + bias  # (B, T, in) @ (in, out) -> (B, T, out)


def matmul_backward(dout: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """dx, dweight, dbias of matmul_forward."""
    # out[t, o] = sum_i x[t, i] * weight[o, i] + bias[o]. The derivative of a product with
    # respect to one factor is the other factor; x[t, i] feeds every out[t, o], so its gradient
    # sums over o, and weight[o, i] is used by every token, so its gradient sums over tokens.
    dx = dout @ weight  # (B, T, out) @ (out, in) -> (B, T, in)
    dweight = dout.flatten(0, 1).T @ x.flatten(0, 1)  # (out, B*T) @ (B*T, in) -> (out, in)
    dbias = dout.sum((0, 1))  # (out,)
    return dx, dweight, dbias


# Causal self-attention --------------------------------------------------------------------------


def split_heads(qkv: Tensor, n_head: int) -> tuple[Tensor, Tensor, Tensor]:
    """The fused c_attn output (B, T, 3C) -> q, k, v, each (B, nh, T, hs)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.split(C, dim=2)  # 3 x (B, T, C)
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
    return q, k, v  # 3 x (B, nh, T, hs)


def merge_heads(x: Tensor) -> Tensor:
    """(B, nh, T, hs) -> (B, T, C): the heads side by side again."""
    B, nh, T, hs = x.shape
    return x.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, nh, hs) -> (B, T, C)


def attention_forward(qkv: Tensor, n_head: int, scale: float) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale, causal) v per head (Vaswani et al., 2017); also the pattern."""
    q, k, v = split_heads(qkv, n_head)  # 3 x (B, nh, T, hs)
    T = q.shape[2]
    scores = q @ k.transpose(-2, -1) * scale  # (B, nh, T, hs) @ (B, nh, hs, T) -> (B, nh, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # (T, T): key > query
    scores = scores.masked_fill(future, float("-inf"))  # exp(-inf) = 0: the future gets no weight
    # softmax: exp, then divide by the row's sum. Subtracting the row's max first changes
    # nothing (it cancels in the division) and keeps exp from overflowing.
    e = (scores - scores.amax(-1, keepdim=True)).exp()  # (B, nh, T, T)
    pattern = e / e.sum(-1, keepdim=True)  # (B, nh, T, T): each row sums to 1
    z = pattern @ v  # (B, nh, T, T) @ (B, nh, T, hs) -> (B, nh, T, hs)
    return merge_heads(z), pattern  # (B, T, C), (B, nh, T, T)


def attention_backward(
    dout: Tensor, qkv: Tensor, pattern: Tensor, n_head: int, scale: float
) -> Tensor:
    """dqkv (B, T, 3C) of attention_forward, given dout (B, T, C)."""
    q, k, v = split_heads(qkv, n_head)  # 3 x (B, nh, T, hs)
    B, nh, T, hs = q.shape
    dz = dout.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs): merge_heads undone
    # z = pattern @ v is a matmul: each factor's gradient is dz times the other factor.
    dpattern = dz @ v.transpose(-2, -1)  # (B, nh, T, hs) @ (B, nh, hs, T) -> (B, nh, T, T)
    dv = pattern.transpose(-2, -1) @ dz  # (B, nh, T, T) @ (B, nh, T, hs) -> (B, nh, T, hs)
    # softmax, p_j = exp(s_j) / sum_k exp(s_k): raising s_i raises p_i, and since the row sums
    # to 1 it takes from every other p_j in proportion: dp_j/ds_i = p_j * ([i == j] - p_i).
    # Summing over j by the chain rule: ds_i = p_i * (dp_i - sum_j p_j * dp_j).
    # A masked score has p = 0, so its gradient is 0: the mask needs no backward of its own.
    dscores = pattern * (dpattern - (pattern * dpattern).sum(-1, keepdim=True))  # (B, nh, T, T)
    dscores = dscores * scale  # scores = q k^T * scale: a constant factor passes through
    # scores = q @ k^T is a matmul again.
    dq = dscores @ k  # (B, nh, T, T) @ (B, nh, T, hs) -> (B, nh, T, hs)
    dk = dscores.transpose(-2, -1) @ q  # (B, nh, T, T) @ (B, nh, T, hs) -> (B, nh, T, hs)
    # split's backward puts each piece's gradient back where the piece came from.
    return torch.cat([merge_heads(dq), merge_heads(dk), merge_heads(dv)], dim=2)  # (B, T, 3C)


# GELU -------------------------------------------------------------------------------------------

GELU_SCALE = math.sqrt(2 / math.pi)  # the tanh approximation's constants (Hendrycks & Gimpel)
GELU_CUBE = 0.044715


def gelu_forward(x: Tensor) -> Tensor:
    """GPT-2's GELU ("gelu_new"): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    u = GELU_SCALE * (x + GELU_CUBE * x**3)  # (B, T, 4C)
    return 0.5 * x * (1 + torch.tanh(u))  # (B, T, 4C)


def gelu_backward(dout: Tensor, x: Tensor) -> Tensor:
    """dx of gelu_forward."""
    u = GELU_SCALE * (x + GELU_CUBE * x**3)  # (B, T, 4C)
    tanh_u = torch.tanh(u)  # (B, T, 4C)
    # Product rule on 0.5 x * (1 + tanh u): the first factor's slope times the second, plus
    # the first times the second's slope, which by the chain rule is tanh'(u) * du/dx with
    # tanh' = 1 - tanh^2 and du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2).
    du = GELU_SCALE * (1 + 3 * GELU_CUBE * x**2)  # (B, T, 4C)
    slope = 0.5 * (1 + tanh_u) + 0.5 * x * (1 - tanh_u**2) * du  # (B, T, 4C)
    return dout * slope  # elementwise: each output depends on its own input only


# Residual ---------------------------------------------------------------------------------------


def residual_forward(x: Tensor, branch: Tensor) -> Tensor:
    """The residual stream plus what a branch (attention or MLP) writes into it."""
    return x + branch  # (B, T, C)


def residual_backward(dout: Tensor) -> tuple[Tensor, Tensor]:
    """dx, dbranch of residual_forward: d(x + b)/dx = d(x + b)/db = 1, so both get dout as is.

    This is why deep residual networks train: the gradient reaches early layers unshrunk.
    """
    return dout, dout  # 2 x (B, T, C)


# The block --------------------------------------------------------------------------------------


@torch.no_grad()  # no autograd in this file: every gradient is computed by hand below
def block_forward(block: Block, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """`block` on x (B, T, C), causal without padding or cache, op by op; also the cache:
    the activations the backward reads (autograd keeps the same ones in its graph).
    """
    if block.mlp.act not in (ACTIVATIONS["gelu_new"], ACTIVATIONS["gelu_pytorch_tanh"]):
        raise ValueError("block_forward writes out GPT-2's tanh GELU; this block uses another")
    ln_1, attn, ln_2, mlp = block.ln_1, block.attn, block.ln_2, block.mlp
    ln1, ln1_mean, ln1_rstd = layernorm_forward(x, ln_1.weight, ln_1.bias, ln_1.eps)  # (B, T, C)
    qkv = matmul_forward(ln1, attn.c_attn.weight, attn.c_attn.bias)  # (B, T, 3C)
    # attn.scale is 1/sqrt(hs): q . k sums hs products, so this keeps the scores' spread ~1.
    z, pattern = attention_forward(qkv, attn.n_head, attn.scale)  # (B, T, C), (B, nh, T, T)
    attn_out = matmul_forward(z, attn.c_proj.weight, attn.c_proj.bias)  # (B, T, C)
    resid_mid = residual_forward(x, attn_out)  # (B, T, C)
    ln2, ln2_mean, ln2_rstd = layernorm_forward(resid_mid, ln_2.weight, ln_2.bias, ln_2.eps)
    pre = matmul_forward(ln2, mlp.c_fc.weight, mlp.c_fc.bias)  # (B, T, C) -> (B, T, 4C)
    post = gelu_forward(pre)  # (B, T, 4C)
    mlp_out = matmul_forward(post, mlp.c_proj.weight, mlp.c_proj.bias)  # (B, T, 4C) -> (B, T, C)
    out = residual_forward(resid_mid, mlp_out)  # (B, T, C)
    cache = dict(
        ln1=ln1, ln1_mean=ln1_mean, ln1_rstd=ln1_rstd, qkv=qkv, pattern=pattern, z=z,
        resid_mid=resid_mid, ln2=ln2, ln2_mean=ln2_mean, ln2_rstd=ln2_rstd, pre=pre, post=post,
    )  # fmt: skip
    return out, cache


@torch.no_grad()
def block_backward(block: Block, x: Tensor, dout: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """dx and the gradient of every parameter (named as in `block.named_parameters()`) of
    block_forward(block, x), given dout, the gradient of its output: the forward's ops undone
    last to first, each fed its own output's gradient.
    """
    _, c = block_forward(block, x)  # the cache
    ln_1, attn, ln_2, mlp = block.ln_1, block.attn, block.ln_2, block.mlp
    g: dict[str, Tensor] = {}
    # out = resid_mid + mlp_out
    dresid_mid, dmlp_out = residual_backward(dout)  # 2 x (B, T, C)
    dpost, g["mlp.c_proj.weight"], g["mlp.c_proj.bias"] = matmul_backward(
        dmlp_out, c["post"], mlp.c_proj.weight
    )  # dpost (B, T, 4C)
    dpre = gelu_backward(dpost, c["pre"])  # (B, T, 4C)
    dln2, g["mlp.c_fc.weight"], g["mlp.c_fc.bias"] = matmul_backward(
        dpre, c["ln2"], mlp.c_fc.weight
    )  # dln2 (B, T, C)
    dresid_mid_via_mlp, g["ln_2.weight"], g["ln_2.bias"] = layernorm_backward(
        dln2, c["resid_mid"], ln_2.weight, c["ln2_mean"], c["ln2_rstd"]
    )  # dresid_mid_via_mlp (B, T, C)
    # resid_mid reaches the output along two paths, straight and through the MLP: add them.
    dresid_mid = dresid_mid + dresid_mid_via_mlp  # (B, T, C)
    # resid_mid = x + attn_out
    dx, dattn_out = residual_backward(dresid_mid)  # 2 x (B, T, C)
    dz, g["attn.c_proj.weight"], g["attn.c_proj.bias"] = matmul_backward(
        dattn_out, c["z"], attn.c_proj.weight
    )  # dz (B, T, C)
    dqkv = attention_backward(dz, c["qkv"], c["pattern"], attn.n_head, attn.scale)  # (B, T, 3C)
    dln1, g["attn.c_attn.weight"], g["attn.c_attn.bias"] = matmul_backward(
        dqkv, c["ln1"], attn.c_attn.weight
    )  # dln1 (B, T, C)
    dx_via_attn, g["ln_1.weight"], g["ln_1.bias"] = layernorm_backward(
        dln1, x, ln_1.weight, c["ln1_mean"], c["ln1_rstd"]
    )  # dx_via_attn (B, T, C)
    # Likewise x reaches the output straight and through the attention.
    return dx + dx_via_attn, g
