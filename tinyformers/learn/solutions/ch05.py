"""Chapter 5: the residual stream, LayerNorm and the MLP (docs/learn/05-residual-layernorm-mlp.md).

Write the body of each function, then run `tinyformers learn check 5`. Each works on the last
dimension of `x`, [..., C]: every row (token) on its own.
"""

import math

import torch


def layer_norm(
    x: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm: subtract each row's mean, divide by sqrt(its variance + eps), then times
    `gain` and plus `bias` (both [C]). The variance is the mean of the squared differences
    from the mean (divide by C, not C - 1)."""
    centred = x - x.mean(-1, keepdim=True)
    variance = centred.pow(2).mean(-1, keepdim=True)
    return centred / torch.sqrt(variance + eps) * gain + bias


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU, exact: x times the probability that a standard normal number is below x,
    0.5 * x * (1 + erf(x / sqrt(2)))."""
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm: each row times rsqrt(mean of its squares + eps), then times `gain` [C]. No
    mean is subtracted and there is no bias."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain
