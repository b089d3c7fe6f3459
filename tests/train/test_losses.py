"""Pretraining losses: MTP targets stay inside a document; summed CE matches torch's mean CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemotron3.config import preset
from nemotron3.model.nemotron import NemotronHForCausalLM
from nemotron3.train.losses import mtp_labels, mtp_losses, token_cross_entropy


def test_mtp_labels_shift_within_documents() -> None:
    # tokens 10..15; doc A = positions 0-2, doc B = 3-5; labels as pack() makes them (−100 at doc ends)
    labels = torch.tensor([[11, 12, -100, 14, 15, -100]])
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1]])
    assert mtp_labels(labels, doc_ids, 1).tolist() == [[12, -100, -100, 15, -100, -100]]
    assert mtp_labels(labels, doc_ids, 2).tolist() == [[-100, -100, -100, -100, -100, -100]]
    assert mtp_labels(labels, doc_ids, 9).tolist() == [[-100] * 6]


def test_token_cross_entropy_is_sum_and_count() -> None:
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, -100, 3, 4], [0, -100, -100, 6, 5]])
    total, count = token_cross_entropy(logits, labels)
    assert count == 7
    torch.testing.assert_close(total / count, F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1)))


def test_mtp_loss_uses_the_next_token_embedding() -> None:
    """Depth 1 at position t sees token t+1: changing token t+1 changes the MTP logits at t, not before."""
    model = NemotronHForCausalLM(preset("tiny"))
    model.init_weights(torch.Generator().manual_seed(0))
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    doc = torch.zeros_like(ids)
    labels = torch.roll(ids, -1, 1)

    def mtp_logits(tokens: torch.Tensor) -> torch.Tensor:
        out = model(tokens, doc_ids=doc, mtp_depths=1)
        assert len(out.mtp_logits) == 1 and mtp_losses(out.mtp_logits, labels, doc)[0][1] == 11
        return out.mtp_logits[0]

    first = mtp_logits(ids)
    second = mtp_logits(ids.clone().index_fill_(1, torch.tensor([6]), 7))
    # Positions before t = 5 never see token 6. Not bitwise: token 6 can route to other experts, which changes
    # the row counts of the per-expert GEMMs and so MKL's blocking for the other rows (measured ≤ 1e-7 on
    # logits of size ~0.6); a leak of token 6 would move them by ~0.1, as it does position 5 (0.37).
    assert (first[:, :5] - second[:, :5]).abs().max() <= 1e-6
    assert (first[:, 5] - second[:, 5]).abs().max() > 1e-2  # position 5 takes the embedding of token 6
