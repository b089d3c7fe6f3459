"""MoE balancing: aux-loss-free bias update direction, expert load counting, sequence aux loss values."""

from __future__ import annotations

import torch

from nemotron3.config import preset
from nemotron3.model.moe import Router
from nemotron3.train.balance import expert_load, sequence_aux_loss, update_expert_bias


def _router(num_experts: int = 4, top_k: int = 2) -> Router:
    return Router(preset("tiny").replace(n_routed_experts=num_experts, num_experts_per_tok=top_k))


def test_bias_moves_load_from_overloaded_to_underloaded_experts() -> None:
    router = _router()
    update_expert_bias(router, torch.tensor([10.0, 2.0, 4.0, 4.0]), rate=0.01)  # mean 5
    assert router.e_score_correction_bias.tolist() == torch.tensor([-0.01, 0.01, 0.01, 0.01]).tolist()
    router.e_score_correction_bias.zero_()
    update_expert_bias(router, torch.full((4,), 3.0), rate=0.01)  # balanced: nothing moves
    assert router.e_score_correction_bias.abs().max() == 0


def test_bias_update_rebalances_a_skewed_router() -> None:
    """Repeated updates on a router that favours expert 0 drive its load towards the mean."""
    torch.manual_seed(0)
    router = _router(num_experts=4, top_k=1).train()
    with torch.no_grad():
        router.weight.normal_(0, 0.02)
        router.weight[0] += 0.5
    x = torch.randn(512, router.weight.shape[1]).abs()
    router(x)
    before = expert_load(router)
    for _ in range(200):
        router(x)
        update_expert_bias(router, expert_load(router), rate=0.01)
    router(x)
    after = expert_load(router)
    assert before.max() / before.mean() > 2.0
    assert after.max() / after.mean() < before.max() / before.mean() / 1.5


def test_expert_load_skips_padding() -> None:
    router = _router().train()
    router(torch.randn(6, router.weight.shape[1]))
    valid = torch.tensor([[True, True, True, False, False, False]])
    assert expert_load(router, valid).sum() == 3 * router.top_k
    assert expert_load(router).sum() == 6 * router.top_k


def test_sequence_aux_loss_matches_hand_computation() -> None:
    """E=4, k=1, one sequence of 2 tokens: f = E/(k·T)·counts, P = mean normalised scores, L = Σ f·P."""
    router = _router(num_experts=4, top_k=1)
    router.last_scores = torch.tensor([[0.9, 0.1, 0.5, 0.5], [0.2, 0.8, 0.5, 0.5]])
    router.last_indices = torch.tensor([[0], [1]])
    f = torch.tensor([2.0, 2.0, 0.0, 0.0])  # 4/(1·2) · [1, 1, 0, 0]
    p = (router.last_scores / router.last_scores.sum(-1, keepdim=True)).mean(0)
    assert torch.allclose(sequence_aux_loss(router, (1, 2)), (f * p).sum())


def test_sequence_aux_loss_is_one_when_uniform() -> None:
    router = _router(num_experts=4, top_k=2)
    router.last_scores = torch.full((4, 4), 0.3)
    router.last_indices = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert torch.allclose(sequence_aux_loss(router, (1, 4)), torch.tensor(1.0))
