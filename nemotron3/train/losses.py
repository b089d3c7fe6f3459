"""Pretraining losses: next-token cross-entropy, the MTP depth losses, and their weighted total.

MTP (research/architecture.md §10): depth d (1 … D) predicts token t+1+d at position t from the main
model's final hidden state (or depth d−1's output) and the embedding of token t+d. Megatron averages the
D depth losses and scales the mean by `mtp_loss_scaling_factor` (0.3 in NVIDIA's Lightning recipe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemotron3.train.data import IGNORE_INDEX


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed CE over labelled positions and their count. logits [b, t, V] float; labels [b, t] (−100 = skip)."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum",
                           ignore_index=IGNORE_INDEX)  # fmt: skip
    return loss, int((labels != IGNORE_INDEX).sum())


def mtp_labels(labels: torch.Tensor, doc_ids: torch.Tensor, depth: int) -> torch.Tensor:
    """Targets of MTP depth `depth` at each position: labels[t+depth] if still in t's document, else −100.

    labels[t] is token t+1 (or −100), so labels[t+d] is token t+1+d. labels, doc_ids: [b, t] → [b, t].
    """
    out = torch.full_like(labels, IGNORE_INDEX)
    if depth < labels.shape[1]:
        shifted = labels[:, depth:]
        same_doc = doc_ids[:, depth:] == doc_ids[:, :-depth]
        out[:, :-depth] = torch.where(same_doc, shifted, IGNORE_INDEX)
    return out


def mtp_losses(
    mtp_logits: list[torch.Tensor], labels: torch.Tensor, doc_ids: torch.Tensor
) -> list[tuple[torch.Tensor, int]]:
    """(summed CE, count) per MTP depth, from the model's `mtp_logits` (forward with mtp_depths=D)."""
    return [token_cross_entropy(logits, mtp_labels(labels, doc_ids, d)) for d, logits in enumerate(mtp_logits, 1)]
