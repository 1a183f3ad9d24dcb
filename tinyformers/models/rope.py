"""Rotary position embeddings (RoPE, Su et al. 2021): how fast each pair of dimensions turns,
one factory keyed by the config's `rope_type`, and the cos/sin tables every layer reads.

Kinds: "default" (theta^(-2i/hs)), "linear" (positions divided by `factor`: Gemma 3's global
layers, Code Llama) and "llama3" (Llama 3.1's long-context blend).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tinyformers.models import check_value

ROPE_TYPES = ("default", "linear", "llama3")


def rope_type(scaling: dict | None) -> str:
    """The kind a config's `rope_scaling` asks for ("type" in older configs)."""
    return (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"


def check_rope_scaling(scaling: dict | None) -> None:
    """ValueError unless `scaling` is a supported kind with every number it needs finite > 0."""
    kind = rope_type(scaling)
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"rope_scaling {scaling!r:.100} is not supported (rope_type one of {ROPE_TYPES})"
        )
    if kind == "default":
        return
    keys = ["factor", "low_freq_factor", "high_freq_factor"] if kind == "llama3" else ["factor"]
    for key in keys:
        check_value(f"rope_scaling.{key}", "float", scaling.get(key))
    if kind == "llama3":
        key = "rope_scaling.original_max_position_embeddings"
        check_value(key, "int", scaling.get("original_max_position_embeddings"))
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError("rope_scaling: expected high_freq_factor > low_freq_factor")


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> Tensor:
    """The rotation speed of each pair of dimensions (hs/2,) in float32, for `rope_type`."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device="cpu").float() / head_dim)
    kind = rope_type(scaling)
    if kind == "default":
        return inv_freq
    if kind == "linear":  # every position divided by `factor`: the same as turning slower
        return inv_freq / scaling["factor"]
    # llama3: slow dimensions (long wavelengths) are stretched by `factor`, fast ones kept,
    # those in between blended, so a model trained at 8k positions reads 128k.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, blended, scaled)


class Rotary:
    """cos and sin of every (position, dimension) angle, computed once for as many positions as
    a cache holds and looked up per call, not recomputed on every forward.

    Not a module: the tables are derived from the config, never stored in a checkpoint.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None) -> None:
        # subtle: nothing is computed here. The model is built (on the meta device) before its
        # weights are checked against the config, and a config's head_dim of 5 * 10^8 must fail
        # that check, not first fill 2 GB with speeds (a fuzz finding).
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.cos = self.sin = torch.empty(0, head_dim, device="meta")

    def extend(self, n: int, device: torch.device, dtype: torch.dtype) -> None:
        """Make the tables cover positions 0..n-1 on `device` in `dtype`."""
        if self.cos.shape[0] >= n and self.cos.device == device and self.cos.dtype == dtype:
            return
        n = max(n, self.cos.shape[0])
        self.inv_freq = inv_frequencies(self.head_dim, self.theta, self.scaling)  # (hs/2,)
        # fp32 angles, as the reference computes them: position * speed, then cos and sin
        angles = torch.arange(n, device=device).float()[:, None] * self.inv_freq.to(device)
        angles = torch.cat((angles, angles), dim=-1)  # (n, hs): pair (i, i + hs/2) shares one
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)

    def __call__(self, positions: Tensor, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin for `positions` ([B, T], each below `n`), shaped (B, 1, T, hs) to broadcast
        over heads. `n` (the key slots) is a Python number: no look at the positions' values,
        which would stop a compiled step."""
        self.extend(n, positions.device, dtype)
        return self.cos[positions][:, None], self.sin[positions][:, None]


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[i], x[i + hs/2]) by its angle (HF's half-split layout)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
