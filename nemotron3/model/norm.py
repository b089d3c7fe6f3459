"""RMSNorm (block and final norms) and the gated, grouped RMSNorm inside the Mamba-2 mixer.

Both follow research/architecture.md §3 and §5.2 step 6, including where the cast to the model
dtype happens, so that bf16 runs round like the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = w ⊙ x / sqrt(mean(x²) + eps), computed in fp32; the weight multiply happens before the cast back."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., hidden]
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba-2 output norm: gate with silu(z) first, normalise each of `groups` contiguous channel groups.

    The normalised value is cast to the input dtype *before* the weight multiply (opposite of RMSNorm).
    """

    def __init__(self, hidden_size: int, groups: int, eps: float) -> None:
        super().__init__()
        if hidden_size % groups:
            raise ValueError(f"gated norm: width {hidden_size} is not divisible into {groups} groups")
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.groups = groups
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # y, z: [..., I]; returns [..., I] in y's dtype
        dtype = y.dtype
        g = y.float() * F.silu(z.float())
        shape = g.shape
        g = g.view(*shape[:-1], self.groups, shape[-1] // self.groups)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.view(shape).to(dtype)
