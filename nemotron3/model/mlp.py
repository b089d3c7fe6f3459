"""Squared-ReLU MLP: the dense `-` layer and the MoE shared expert (research/architecture.md §6)."""

from __future__ import annotations

import torch
from torch import nn

from nemotron3.model.fused import apply


def relu2(x: torch.Tensor) -> torch.Tensor:
    """relu(x)², Nemotron-H's only MLP activation (`mlp_hidden_act: relu2`); there is no gate projection."""
    return torch.relu(x).square()


def relu2_(x: torch.Tensor) -> torch.Tensor:
    """relu2 in place (inference: no autograd through x), one buffer instead of two fresh ones; same values."""
    return torch.relu_(x).square_()


class MLP(nn.Module):
    """down_proj(relu(up_proj(x))²)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., H] → [..., H]
        return apply(self.down_proj, relu2(apply(self.up_proj, x)))
