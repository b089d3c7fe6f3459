"""MoE load balancing: the aux-loss-free per-expert bias update and the sequence-level auxiliary loss.

Nemotron 3 balances its experts as DeepSeek-V3 does: each router keeps a selection-only bias b_e (the
`e_score_correction_bias` of the checkpoint); after every optimizer step b_e += γ·sign(mean load − load_e),
so overloaded experts get picked less and underloaded more, with no gradient through the loss. A small
sequence-level auxiliary loss (α Σ_e f_e P_e per sequence) guards against extreme imbalance inside one
sequence. γ = 1e-3 and α = 1e-4 are the values reported for Nemotron 3 Nano's pretraining.
"""

from __future__ import annotations

import torch
from torch import nn

from nemotron3.model.moe import Router


def routers(model: nn.Module) -> list[Router]:
    """Every router of the model (main layers and MTP), in module order."""
    return [m for m in model.modules() if isinstance(m, Router)]


def expert_load(router: Router, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens routed to each expert in the router's last training forward: [E] float32 (padding excluded)."""
    indices = router.last_indices  # [T, k]
    if valid is not None:
        indices = indices[valid.reshape(-1)]
    return torch.bincount(indices.reshape(-1), minlength=router.weight.shape[0]).float()


@torch.no_grad()
def update_expert_bias(router: Router, load: torch.Tensor, rate: float) -> None:
    """b_e += rate · sign(mean(load) − load_e): the aux-loss-free update (DeepSeek-V3 §2.1.2)."""
    router.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load).to(router.e_score_correction_bias))


def sequence_aux_loss(router: Router, batch_shape: tuple[int, int], valid: torch.Tensor | None = None) -> torch.Tensor:
    """Sequence-wise balance loss Σ_e f_e·P_e averaged over sequences (multiply by α outside).

    Per sequence of T valid tokens: f_e = E/(k·T) · #{t: e ∈ top-k(t)}, P_e = 1/T · Σ_t s'_{e,t} with
    s' the sigmoid scores normalised over experts (DeepSeek-V3 eq. 17–20). f carries no gradient.
    Uniform routing gives Σ_e f_e P_e = 1.
    """
    b, t = batch_shape
    scores = router.last_scores.view(b, t, -1)  # [b, t, E] fp32
    E, k = scores.shape[-1], router.top_k
    mask = torch.ones(b, t, device=scores.device) if valid is None else valid.float()
    picked = torch.zeros_like(scores).scatter_(-1, router.last_indices.view(b, t, k), 1.0)
    tokens = mask.sum(1).clamp(min=1.0)  # [b]
    f = E / k * (picked * mask[..., None]).sum(1) / tokens[:, None]  # [b, E]
    p = ((scores / scores.sum(-1, keepdim=True)) * mask[..., None]).sum(1) / tokens[:, None]
    return (f.detach() * p).sum(-1).mean()
