"""GRPO / MOPD objectives against hand-computed references on tiny tensors (issue 8 items 2-3)."""

from __future__ import annotations

import math

import pytest
import torch

from nemotron3.train.objectives import (
    group_advantages,
    grpo_loss,
    mopd_loss,
    mopd_token_advantages,
    truncated_importance_weights,
)

E = math.exp


def close(actual: torch.Tensor, expected: list | float, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ---- group_advantages ------------------------------------------------------------------------------------------


def test_group_advantages_grpo_hand_computed() -> None:
    # mean 0.5, centred ±0.5, Bessel std = sqrt(4·0.25/3) = sqrt(1/3) → ±0.5·sqrt(3) = ±0.8660254
    close(group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), eps=0.0), [0.8660254, -0.8660254, -0.8660254, 0.8660254])
    # row 0: mean 0.25, centred [.75, -.25, -.25, -.25], std = sqrt((.5625 + 3·.0625)/3) = 0.5; row 1 constant
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    close(group_advantages(rewards, eps=0.0), [[1.5, -0.5, -0.5, -0.5], [0.0, 0.0, 0.0, 0.0]])
    close(
        group_advantages(rewards), [[0.75 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001], [0.0] * 4]
    )


def test_group_advantages_dr_grpo_keeps_scale() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [3.0, 1.0, 2.0, 2.0]])
    close(group_advantages(rewards, normalize_std=False), [[0.75, -0.25, -0.25, -0.25], [1.0, -1.0, 0.0, 0.0]])


def test_zero_variance_groups_give_exact_zero_not_nan() -> None:
    # 0.1 is not exactly representable: the float mean may differ from it by an ulp, which /eps would blow up
    for rewards in (torch.full((3, 7), 0.1), torch.tensor([[5.0]]), torch.tensor([0.0, 0.0]), torch.tensor([1, 1, 1])):
        for normalize in (True, False):
            adv = group_advantages(rewards, normalize_std=normalize)
            assert torch.isfinite(adv).all()
            assert (adv == 0).all()
    # integer rewards work and come back as floats
    close(group_advantages(torch.tensor([1, 0]), eps=0.0), [math.sqrt(0.5), -math.sqrt(0.5)])


def test_group_advantages_bad_shape_raises() -> None:
    for bad in (torch.tensor(1.0), torch.zeros(2, 3, 4), torch.zeros(2, 0)):
        with pytest.raises(ValueError, match="rewards"):
            group_advantages(bad)


# ---- grpo_loss ---------------------------------------------------------------------------------------------------

# two completions, the second one token shorter (its last position is padding with junk values)
LP = [[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0]]
OLD = [[-1.0, -0.8, -1.5], [-0.3, -1.0, 5.0]]
REF = [[-1.0, -0.5, -1.0], [-0.5, -1.2, 9.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [1.0, -1.0]
# ratios exp(lp − old): [1, e^0.3, e^-0.5], [1, e^-0.2]
R01, R02, R11 = E(0.3), E(-0.5), E(-0.2)


def _grpo(lp: list = LP, **kw: object) -> tuple[torch.Tensor, dict, torch.Tensor]:
    logprobs = torch.tensor(lp, requires_grad=True)
    args = {"ref_logprobs": None, "advantages": torch.tensor(ADV), "mask": torch.tensor(MASK, dtype=torch.bool)}
    args.update(kw)
    old = args.pop("old_logprobs", torch.tensor(OLD))
    loss, stats = grpo_loss(logprobs, old, **args)
    loss.backward()
    return loss, stats, logprobs.grad


def test_grpo_token_mean_hand_computed_with_clipping() -> None:
    loss, stats, grad = _grpo()
    # A=+1 row: −min(ρ, clip(ρ, .8, 1.2)): −1, −1.2 (clipped: e^0.3 > 1.2), −e^-0.5 (unclipped is the min)
    # A=−1 row: −min(−ρ, −clip(ρ)): +1, +e^-0.2 (inside the range)
    per_token = [-1.0, -1.2, -R02, 1.0, R11]
    close(loss, sum(per_token) / 5)
    close(stats["loss_pg"], sum(per_token) / 5)
    close(stats["clip_frac"], 1 / 5)
    close(stats["ratio_mean"], (1 + E(0.3) + R02 + 1 + R11) / 5)
    close(stats["kl"], 0.0)
    # d/dlp of −ρA = −ρA; the clipped token and the padding get exactly zero gradient
    close(grad, [[-1 / 5, 0.0, -R02 / 5], [1 / 5, R11 / 5, 0.0]])
    assert grad[0, 1] == 0 and grad[1, 2] == 0


def test_grpo_seq_mean_differs_from_token_mean_on_unequal_lengths() -> None:
    loss, _, grad = _grpo(loss_agg="seq-mean")
    row0, row1 = (-1.0 - 1.2 - R02) / 3, (1.0 + R11) / 2
    close(loss, (row0 + row1) / 2)
    assert abs(loss.item() - (-1.0 - 1.2 - R02 + 1.0 + R11) / 5) > 0.1
    # each token of the 2-token row weighs 1/(2·2), of the 3-token row 1/(2·3)
    close(grad, [[-1 / 6, 0.0, -R02 / 6], [1 / 4, R11 / 4, 0.0]])
    # equal lengths: both aggregations agree
    full = torch.ones(2, 3, dtype=torch.bool)
    a, _, _ = _grpo(mask=full)
    b, _, _ = _grpo(mask=full, loss_agg="seq-mean")
    close(a, b.item())


def test_grpo_clip_higher_and_low_clip_branch() -> None:
    # DAPO clip-higher ε_high = 0.4: e^0.3 = 1.35 < 1.4 is no longer clipped
    loss, stats, grad = _grpo(clip_eps_high=0.4)
    close(loss, (-1.0 - E(0.3) - R02 + 1.0 + R11) / 5)
    close(stats["clip_frac"], 0.0)
    close(grad[0, 1], -E(0.3) / 5)
    # ε_low = 0.1: A=−1 token with ρ = e^-0.2 = 0.819 < 0.9 takes the clipped value 0.9 and no gradient;
    # the A=+1 token with ρ = e^-0.5 < 0.9 keeps its unclipped value (the min) and its gradient
    loss, stats, grad = _grpo(clip_eps=0.1, clip_eps_high=0.4)
    close(loss, (-1.0 - E(0.3) - R02 + 1.0 + 0.9) / 5)
    close(stats["clip_frac"], 1 / 5)
    assert grad[1, 1] == 0
    close(grad[0, 2], -R02 / 5)


def test_grpo_k3_kl_penalty() -> None:
    # ref − lp = [0, 0, 1], [−0.2, 0]; k3 = e^x − x − 1 = [0, 0, e − 2], [e^-0.2 − 0.8, 0]
    k3 = [0.0, 0.0, E(1.0) - 2.0, E(-0.2) - 0.8, 0.0]
    pg = (-1.0 - 1.2 - R02 + 1.0 + R11) / 5
    loss, stats, grad = _grpo(ref_logprobs=torch.tensor(REF), kl_coef=0.1)
    close(loss, pg + 0.1 * sum(k3) / 5)
    close(stats["kl"], sum(k3) / 5)
    close(stats["loss_pg"], pg)
    # d k3 / d lp = 1 − e^(ref − lp)
    close(grad[0, 2], (-R02 + 0.1 * (1 - E(1.0))) / 5)
    close(grad[1, 0], (1.0 + 0.1 * (1 - E(-0.2))) / 5)
    # kl is reported even when it is not in the loss
    loss0, stats0, _ = _grpo(ref_logprobs=torch.tensor(REF))
    close(loss0, pg)
    close(stats0["kl"], sum(k3) / 5)


def test_grpo_padding_contributes_nothing() -> None:
    base_loss, base_stats, base_grad = _grpo(ref_logprobs=torch.tensor(REF), kl_coef=0.1)
    junk_lp = [row[:] for row in LP]
    junk_lp[1][2] = 50.0  # exp(50 − 5) would dominate everything if it leaked
    old = torch.tensor(OLD)
    old[1, 2] = float("-inf")
    ref = torch.tensor(REF)
    ref[1, 2] = float("nan")
    loss, stats, grad = _grpo(lp=junk_lp, ref_logprobs=ref, kl_coef=0.1, old_logprobs=old)
    assert torch.isfinite(grad).all()
    close(loss, base_loss.item())
    close(grad, base_grad.tolist())
    for k in stats:
        close(stats[k], base_stats[k].item())
    # float mask and per-token [B, T] advantages equal to the broadcast ones give the same result
    adv_bt = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 123.0]])
    loss2, _, grad2 = _grpo(mask=torch.tensor(MASK, dtype=torch.float32), advantages=adv_bt)
    loss3, _, grad3 = _grpo()
    close(loss2, loss3.item())
    close(grad2, grad3.tolist())


def test_grpo_bad_shapes_raise_naming_the_argument() -> None:
    lp, old = torch.zeros(2, 3), torch.zeros(2, 3)
    ok = {"ref_logprobs": None, "advantages": torch.zeros(2), "mask": torch.ones(2, 3)}
    cases = {
        "logprobs": (torch.zeros(6), torch.zeros(6), {}),
        "old_logprobs": (lp, torch.zeros(2, 4), {}),
        "ref_logprobs": (lp, old, {"ref_logprobs": torch.zeros(3, 3)}),
        "advantages": (lp, old, {"advantages": torch.zeros(3)}),
        "mask": (lp, old, {"mask": torch.ones(2, 2)}),
        "is_weights": (lp, old, {"is_weights": torch.ones(2)}),
        "loss_agg": (lp, old, {"loss_agg": "sum"}),
    }
    for name, (a, b, kw) in cases.items():
        with pytest.raises(ValueError, match=name):
            grpo_loss(a, b, **{**ok, **kw})
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(lp, old, **{**ok, "kl_coef": 0.1})


# ---- truncated importance sampling --------------------------------------------------------------------------------


def test_truncated_importance_weights() -> None:
    behavior = torch.tensor([[-1.0, -2.0, -0.5]])
    logprobs = torch.tensor([[-1.0, -1.0, -1.5]], requires_grad=True)
    w = truncated_importance_weights(behavior, logprobs, cap=2.0)
    close(w, [[1.0, 2.0, E(-1.0)]])  # ratios 1, e ≈ 2.72 → 2, e^-1
    assert not w.requires_grad
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weights(behavior, logprobs, cap=0.0)
    with pytest.raises(ValueError, match="logprobs"):
        truncated_importance_weights(behavior, torch.zeros(1, 2), cap=2.0)
    # as grpo_loss is_weights: they scale each token's surrogate term and its gradient
    wts = torch.tensor([[0.5, 2.0, 1.0], [1.0, 0.25, 7.0]])
    loss, _, grad = _grpo(is_weights=wts)
    close(loss, (-0.5 - 2.4 - R02 + 1.0 + 0.25 * R11) / 5)
    close(grad, [[-0.5 / 5, 0.0, -R02 / 5], [1 / 5, 0.25 * R11 / 5, 0.0]])


# ---- MOPD ----------------------------------------------------------------------------------------------------------

STUDENT = [[-1.0, -2.0, -0.5], [-0.2, -3.0, 0.0]]
TEACHER = [[-0.5, -2.5, -0.5], [-1.2, -1.0, 4.0]]


def test_mopd_token_advantages_are_teacher_minus_student_and_detached() -> None:
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)
    adv = mopd_token_advantages(student, teacher, torch.tensor(MASK))
    close(adv, [[0.5, -0.5, 0.0], [-1.0, 2.0, 0.0]])
    assert not adv.requires_grad


def test_mopd_loss_policy_gradient_form() -> None:
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)
    loss, stats = mopd_loss(student, teacher, torch.tensor(MASK))
    # −Σ A·lp / 5 = −[(0.5·−1) + (−0.5·−2) + (−1·−0.2) + (2·−3)] / 5 = −(−0.5 + 1 + 0.2 − 6) / 5
    close(loss, 5.3 / 5)
    close(stats["reverse_kl"], -(0.5 - 0.5 - 1.0 + 2.0) / 5)  # mean of student − teacher
    close(stats["advantage_mean"], 1.0 / 5)
    loss.backward()
    # stop-gradient on A: d/dlp = −A/N exactly (without it, −(t − 2·lp)/N would appear); no teacher gradient
    close(student.grad, [[-0.1, 0.1, 0.0], [0.2, -0.4, 0.0]])
    assert teacher.grad is None
    # seq-mean: rows −(−0.5 + 1)/3 and −(0.2 − 6)/2
    loss_seq, _ = mopd_loss(student, teacher, torch.tensor(MASK), loss_agg="seq-mean")
    close(loss_seq, (-0.5 / 3 + 5.8 / 2) / 2)


def test_mopd_loss_mixes_sequence_reward_advantage() -> None:
    student = torch.tensor(STUDENT, requires_grad=True)
    # A = [0.5, −0.5, 0] + 0.5·1, [−1, 2] + 0.5·(−2) = [1, 0, 0.5], [−2, 1]
    loss, stats = mopd_loss(
        student,
        torch.tensor(TEACHER),
        torch.tensor(MASK),
        reward_advantages=torch.tensor([1.0, -2.0]),
        reward_weight=0.5,
    )
    close(loss, (1.25 + 2.6) / 5)
    close(stats["advantage_mean"], (1.0 + 0.0 + 0.5 - 2.0 + 1.0) / 5)
    loss.backward()
    close(student.grad, [[-0.2, 0.0, -0.1], [0.4, -0.2, 0.0]])
    # distill_weight 0 leaves the pure sequence-reward REINFORCE loss
    loss_r, _ = mopd_loss(
        student,
        torch.tensor(TEACHER),
        torch.tensor(MASK),
        reward_advantages=torch.tensor([1.0, -2.0]),
        reward_weight=1.0,
        distill_weight=0.0,
    )
    close(loss_r, -(1.0 * (-3.5) - 2.0 * (-3.2)) / 5)


def test_mopd_padding_and_bad_shapes() -> None:
    student = torch.tensor(STUDENT)
    student[1, 2] = float("-inf")
    teacher = torch.tensor(TEACHER)
    teacher[1, 2] = float("nan")
    student.requires_grad_(True)
    loss, stats = mopd_loss(student, teacher, torch.tensor(MASK, dtype=torch.bool))
    close(loss, 5.3 / 5)
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad[1, 2] == 0
    assert all(torch.isfinite(v) for v in stats.values())
    s, t, m = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        mopd_token_advantages(s, torch.zeros(3, 2), m)
    with pytest.raises(ValueError, match="student_logprobs"):
        mopd_token_advantages(torch.zeros(3), torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="mask"):
        mopd_loss(s, t, torch.ones(2, 4))
    with pytest.raises(ValueError, match="reward_advantages"):
        mopd_loss(s, t, m, reward_advantages=torch.zeros(2, 3), reward_weight=1.0)
    with pytest.raises(ValueError, match="reward_advantages"):
        mopd_loss(s, t, m, reward_weight=1.0)
    with pytest.raises(ValueError, match="is_weights"):
        mopd_loss(s, t, m, is_weights=torch.ones(3))


def test_mopd_loss_with_behaviour_logprobs() -> None:
    """Stale rollouts: the advantage uses the sampling policy's log-probs, the gradient at ratio 1 is the
    on-policy REINFORCE one, and tokens pushed past the clip range get none."""
    torch.manual_seed(0)
    lp = torch.randn(2, 5) - 2
    teacher = torch.randn(2, 5) - 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    grads = []
    for behaviour in (None, lp.clone()):
        x = lp.clone().requires_grad_(True)
        loss, stats = mopd_loss(x, teacher, mask, behavior_logprobs=behaviour)
        loss.backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert float(stats["ratio_mean"]) == pytest.approx(1.0) and float(stats["clip_frac"]) == 0.0
    # advantage and reverse-KL statistic against the behaviour policy, not the current one
    behaviour = lp - 0.5
    x = lp.clone().requires_grad_(True)
    loss, stats = mopd_loss(x, teacher, mask, behavior_logprobs=behaviour, clip_eps=0.2)
    valid = mask > 0
    close(stats["reverse_kl"], float((behaviour - teacher)[valid].mean()))
    loss.backward()
    # ratio e^0.5 ≈ 1.65 > 1.2: tokens with a positive advantage are clipped (no gradient), the others are not
    adv = (teacher - behaviour) * mask
    assert torch.all(x.grad[(adv > 0) & valid] == 0) and torch.all(x.grad[(adv < 0) & valid] != 0)
    close(stats["clip_frac"], float(((adv > 0) & valid).float().sum() / mask.sum()))
