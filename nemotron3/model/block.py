"""A Nemotron-H block: h = h + mixer(RMSNorm(h)), with exactly one mixer per layer (architecture.md §3)."""

from __future__ import annotations

import torch
from torch import nn

from nemotron3.config import ATTENTION, MAMBA, MOE, ModelConfig
from nemotron3.config import MLP as MLP_KIND
from nemotron3.model.attention import Attention
from nemotron3.model.cache import LayerState
from nemotron3.model.mamba2 import Mamba2Mixer
from nemotron3.model.mlp import MLP
from nemotron3.model.moe import MoE
from nemotron3.model.norm import RMSNorm


def make_mixer(config: ModelConfig, kind: str) -> nn.Module:
    if kind == MAMBA:
        return Mamba2Mixer(config)
    if kind == ATTENTION:
        return Attention(config)
    if kind == MOE:
        return MoE(config)
    if kind == MLP_KIND:
        return MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
    raise ValueError(f"unknown layer kind {kind!r}")


class Block(nn.Module):
    """Pre-norm residual block around one mixer; `kind` is the layers_block_type entry."""

    def __init__(self, config: ModelConfig, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = make_mixer(config, kind)

    def new_state(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> LayerState:
        if self.kind in (MAMBA, ATTENTION):
            return self.mixer.new_state(batch_size, dtype, device)
        return None

    def forward(
        self,
        hidden: torch.Tensor,
        state: LayerState = None,
        decode: bool | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden: [b, t, H] → [b, t, H]. `decode` picks the Mamba recurrence step over the scan
        (default: one token with a state); the two agree except for transformers' Δ clamp (§5.8).
        `segments` [b, t] isolates packed documents in the mixers that mix over time (training only)."""
        x = self.norm(hidden)
        if self.kind == MAMBA:
            x = self.mixer(x, state, decode, segments)
        elif self.kind == ATTENTION:
            x = self.mixer(x, state, segments)
        else:
            x = self.mixer(x)
        return hidden + x
