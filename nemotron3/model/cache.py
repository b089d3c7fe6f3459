"""The model-level cache: one state per layer for a batch of sequences that advance together.

Attention layers hold their K/V (grows with the sequence); Mamba layers hold a fixed-size conv window
and float32 SSM state; MoE and MLP layers hold nothing. The engine's paged cache (engine/cache.py)
builds the same per-layer states from its pools.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nemotron3.model.attention import KVState
from nemotron3.model.mamba2 import MambaState

LayerState = KVState | MambaState | None


@dataclass
class ModelCache:
    """Per-layer states (`layers[i]` for main layer i) and the number of tokens consumed so far."""

    layers: list[LayerState]
    seq_len: int = 0
    mtp_layers: list[LayerState] = field(default_factory=list)
