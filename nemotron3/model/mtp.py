"""Multi-Token-Prediction block (research/architecture.md §10), stored as `mtp.layers.{block·len + j}`.

One block = the layer kinds of `mtp_layers_block_type` (Super: attention then MoE). Its first layer
also owns enorm, hnorm and eh_proj; its last layer owns final_layernorm. For a draft step:
    u = eh_proj(concat[enorm(embed(next_token)), hnorm(h)]);  u = layers(u);  out = final_layernorm(u)
and the shared lm_head turns `out` into logits; `out` is also the h of the next draft step.
"""

from __future__ import annotations

import torch
from torch import nn

from nemotron3.config import ModelConfig
from nemotron3.model.block import Block
from nemotron3.model.cache import LayerState
from nemotron3.model.norm import RMSNorm


class MTPLayer(Block):
    """A block inside the MTP stack; the first and last of each block carry the extra projections/norms."""

    def __init__(self, config: ModelConfig, kind: str, first: bool, last: bool) -> None:
        super().__init__(config, kind)
        H, eps = config.hidden_size, config.layer_norm_epsilon
        if first:
            self.enorm = RMSNorm(H, eps)
            self.hnorm = RMSNorm(H, eps)
            self.eh_proj = nn.Linear(2 * H, H, bias=False)
        if last:
            self.final_layernorm = RMSNorm(H, eps)


class MTP(nn.Module):
    """`num_nextn_predict_layers` MTP blocks, flattened into one `layers` list as on the hub."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        kinds = config.mtp_layers_block_type
        self.block_len = len(kinds)
        self.num_blocks = config.num_nextn_predict_layers
        self.layers = nn.ModuleList(
            MTPLayer(config, kind, first=j == 0, last=j == len(kinds) - 1)
            for _ in range(self.num_blocks)
            for j, kind in enumerate(kinds)
        )

    def block(self, index: int) -> list[MTPLayer]:
        return list(self.layers[index * self.block_len : (index + 1) * self.block_len])

    def forward(
        self,
        hidden: torch.Tensor,
        next_embeds: torch.Tensor,
        block_index: int = 0,
        states: list[LayerState] | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden: [b, t, H] (main model's final-norm output, or the previous draft's output);
        next_embeds: [b, t, H] embeddings of the following tokens; segments: [b, t] packed documents
        (training). Returns [b, t, H] after final_layernorm."""
        layers = self.block(block_index)
        first, last = layers[0], layers[-1]
        u = first.eh_proj(torch.cat([first.enorm(next_embeds), first.hnorm(hidden)], dim=-1))
        for j, layer in enumerate(layers):
            u = layer(u, states[j] if states is not None else None, segments=segments)
        return last.final_layernorm(u)
