"""Post-training objectives: GRPO-style RLVR and multi-teacher on-policy distillation (MOPD), as pure functions.

Issue 8 items 2 and 3. The trainers that sample rollouts, score them and step the optimiser live elsewhere;
these functions only turn per-token log-probabilities (of the sampled tokens) and rewards into a scalar loss.

Conventions shared by every function here:

* ``logprobs`` and friends are ``[B, T]``: the log-probability, under some policy, of the token that was
  actually sampled at each completion position (gather the log-softmax at the sampled id before calling).
* ``mask`` is ``[B, T]`` (bool or 0/1 float): 1 on completion tokens that count, 0 on prompt and padding.
  Masked positions contribute nothing to a loss, to its gradient or to a statistic, whatever they hold.
* Aggregation ``"token-mean"`` averages over every valid token of the batch, so each token weighs the same
  (DAPO, arXiv 2503.14476 §3.3); ``"seq-mean"`` averages within each sequence first, then over the
  sequences that have at least one valid token (original GRPO, DeepSeekMath arXiv 2402.03300 eq. 3), which
  gives the tokens of short sequences more weight.
"""

from __future__ import annotations

import torch

LOSS_AGGREGATIONS = ("token-mean", "seq-mean")


def _require_shape(name: str, tensor: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def _require_2d(name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be [B, T], got shape {tuple(tensor.shape)}")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is set; 0 when nothing is."""
    kept = torch.where(mask > 0, values * mask, torch.zeros_like(values))
    return kept.sum() / mask.sum().clamp(min=1.0)


def _zero_masked(tensor: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Replace masked positions by 0 so padding values (even ±inf/NaN) reach neither the loss nor a gradient."""
    return torch.where(valid, tensor, torch.zeros_like(tensor))


def aggregate_token_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token-mean") -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar over the valid tokens of ``mask`` (see module docstring).

    token-mean: Σ_{i,t} m_it ℓ_it / Σ_{i,t} m_it.
    seq-mean:   (1/|S|) Σ_{i∈S} (Σ_t m_it ℓ_it / Σ_t m_it), S = sequences with Σ_t m_it > 0.
    Masked positions are zeroed with ``torch.where`` so a NaN/inf there cannot leak into the result.
    """
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {loss_agg!r}")
    valid = mask > 0
    weighted = torch.where(valid, per_token * mask, torch.zeros_like(per_token))
    if loss_agg == "token-mean":
        return weighted.sum() / mask.sum().clamp(min=1.0)
    lengths = mask.sum(dim=-1)
    has_tokens = lengths > 0
    per_seq = weighted.sum(dim=-1) / lengths.clamp(min=1.0)
    return per_seq.sum() / has_tokens.sum().clamp(min=1)


def _as_float_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    _require_shape("mask", mask, like.shape)
    return mask.to(dtype=like.dtype)


def group_advantages(rewards: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages of GRPO, one per completion: ``[G]`` or ``[B, G]`` rewards → same shape.

    With ``normalize_std`` (GRPO, DeepSeekMath arXiv 2402.03300 §4.1.2, "outcome supervision"):

        A_i = (r_i − mean_g(r)) / (std_g(r) + eps)

    where the mean and the (Bessel-corrected, as in TRL and verl) std run over the G completions sampled
    for the same prompt (the last dimension). Without it (Dr. GRPO, arXiv 2503.20783 §3.1, which drops the
    std to remove the question-difficulty bias): A_i = r_i − mean_g(r).

    A group whose rewards are all equal (all right or all wrong, or G = 1) carries no learning signal: its
    advantages are exactly 0, never NaN and never ±(rounding error)/eps.
    """
    if rewards.dim() not in (1, 2) or rewards.shape[-1] == 0:
        raise ValueError(f"rewards must be [G] or [B, G] with G >= 1, got shape {tuple(rewards.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    r = rewards.float() if not rewards.is_floating_point() else rewards
    centred = r - r.mean(dim=-1, keepdim=True)
    constant = (r == r[..., :1]).all(dim=-1, keepdim=True)
    if normalize_std:
        std = r.std(dim=-1, keepdim=True) if r.shape[-1] > 1 else torch.zeros_like(centred[..., :1])
        centred = centred / (std + eps)
    return torch.where(constant, torch.zeros_like(centred), centred)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    kl_coef: float = 0.0,
    loss_agg: str = "token-mean",
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO / PPO clipped surrogate with an optional k3 KL penalty to a reference policy.

    Per valid token t of completion i (DeepSeekMath arXiv 2402.03300 eq. 3; PPO arXiv 1707.06347 eq. 7):

        ρ_it  = exp(logp_it − old_logp_it)                                 (importance ratio)
        ℓ_it  = −min(ρ_it A_it, clip(ρ_it, 1 − ε_low, 1 + ε_high) A_it) + β k3_it
        k3_it = exp(ref_it − logp_it) − (ref_it − logp_it) − 1             (Schulman's unbiased, ≥ 0 KL estimator)

    ε_low = ``clip_eps``; ε_high = ``clip_eps_high`` or ``clip_eps`` (an asymmetric, larger ε_high is DAPO's
    "clip-higher", arXiv 2503.14476 §3.1). β = ``kl_coef``; with β = 0 (DAPO and Dr. GRPO drop the KL term)
    ``ref_logprobs`` may be None. Where the clipped term is the minimum the token has zero gradient.

    Args:
        logprobs: [B, T] current policy's log-prob of each sampled token (carries the gradient).
        old_logprobs: [B, T] log-probs of the policy the advantages belong to (treated as constant).
        ref_logprobs: [B, T] reference policy's log-probs (constant), or None when kl_coef == 0.
        advantages: [B] per completion (broadcast over its tokens, e.g. from `group_advantages`) or [B, T].
        mask: [B, T] valid completion tokens.
        is_weights: optional [B, T] per-token weights multiplying the surrogate term, e.g. the truncated
            importance weights of `truncated_importance_weights` for rollouts from a stale/async engine.
        loss_agg: "token-mean" or "seq-mean" (module docstring).

    Returns:
        (loss, stats): scalar loss; stats are detached scalars over valid tokens: ``clip_frac`` (fraction of
        tokens whose clipped branch is active, i.e. that get no gradient), ``ratio_mean``, ``kl`` (mean k3,
        computed whenever ref_logprobs is given) and ``loss_pg`` (the surrogate part of the loss).
    """
    _require_2d("logprobs", logprobs)
    _require_shape("old_logprobs", old_logprobs, logprobs.shape)
    if ref_logprobs is not None:
        _require_shape("ref_logprobs", ref_logprobs, logprobs.shape)
    elif kl_coef != 0.0:
        raise ValueError("ref_logprobs is required when kl_coef != 0")
    if advantages.dim() == 1:
        _require_shape("advantages", advantages, logprobs.shape[:1])
        advantages = advantages[:, None]
    else:
        _require_shape("advantages", advantages, logprobs.shape)
    m = _as_float_mask(mask, logprobs)
    if is_weights is not None:
        _require_shape("is_weights", is_weights, logprobs.shape)
    if clip_eps < 0 or (clip_eps_high is not None and clip_eps_high < 0):
        raise ValueError(f"clip_eps and clip_eps_high must be >= 0, got {clip_eps}, {clip_eps_high}")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high

    valid = m > 0
    logprobs = _zero_masked(logprobs, valid)
    old_logprobs = _zero_masked(old_logprobs, valid)
    if ref_logprobs is not None:
        ref_logprobs = _zero_masked(ref_logprobs, valid)
    if is_weights is not None:
        is_weights = _zero_masked(is_weights, valid)
    advantages = _zero_masked(advantages.detach().to(logprobs.dtype).expand_as(logprobs), valid)
    ratio = torch.exp(logprobs - old_logprobs.detach())
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    loss_pg = aggregate_token_loss(per_token, m, loss_agg)
    loss = loss_pg

    kl = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    if ref_logprobs is not None:
        log_ratio_ref = ref_logprobs.detach() - logprobs
        k3 = torch.exp(log_ratio_ref) - log_ratio_ref - 1.0
        if kl_coef != 0.0:
            loss = loss + kl_coef * aggregate_token_loss(k3, m, loss_agg)
        kl = _masked_mean(k3.detach(), m)

    with torch.no_grad():
        clip_active = ((ratio > 1.0 + eps_high) & (advantages > 0)) | ((ratio < 1.0 - clip_eps) & (advantages < 0))
        stats = {
            "clip_frac": _masked_mean(clip_active.to(m.dtype), m),
            "ratio_mean": _masked_mean(ratio, m),
            "kl": kl,
            "loss_pg": loss_pg.detach(),
        }
    return loss, stats


def truncated_importance_weights(behavior_logprobs: torch.Tensor, logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance-sampling weights for tokens sampled by a stale (asynchronous) behaviour policy.

        w_t = min(exp(logp_t − behavior_logp_t), C),   detached

    When rollouts come from an inference engine whose weights lag the trainer (async RL), or whose numerics
    differ from it, the tokens are off-policy; weighting each token's policy-gradient term by the truncated
    ratio π_train/π_behavior corrects for it with bounded variance (truncated IS: Ionides 2008; IMPALA's
    ρ̄-truncation, arXiv 1802.01561 §4.1; "Your efficient RL framework secretly brings you off-policy RL
    training", Yao et al. 2025, for the rollout/trainer mismatch). The weights are constants (no gradient):
    pass them as ``is_weights`` to `grpo_loss`. Both inputs and the result are the same shape (e.g. [B, T]).
    """
    _require_shape("logprobs", logprobs, behavior_logprobs.shape)
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    with torch.no_grad():
        return torch.exp(logprobs - behavior_logprobs).clamp(max=cap)


def mopd_token_advantages(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per-token MOPD advantage of the student's own sampled tokens: A_t = log π_T(y_t|·) − log π_S(y_t|·).

    On-policy distillation minimises the reverse KL KL(π_S ‖ π_T) = E_{y∼π_S}[log π_S(y) − log π_T(y)] on the
    student's own rollouts; for a token y_t sampled from π_S, log π_S(y_t) − log π_T(y_t) is the single-sample
    (unbiased) estimate of the per-token reverse KL, so the advantage is its negative: tokens the domain
    teacher finds likelier than the student are reinforced, the others pushed down (Agarwal et al. GKD,
    arXiv 2306.13649; Thinking Machines "On-Policy Distillation", 2025; Nemotron 3 MOPD, where each prompt's
    domain teacher scores every token). The result is detached (a reward, not a path for gradients) and 0 on
    masked positions. All inputs [B, T]; returns [B, T].
    """
    _require_2d("student_logprobs", student_logprobs)
    _require_shape("teacher_logprobs", teacher_logprobs, student_logprobs.shape)
    m = _as_float_mask(mask, student_logprobs)
    valid = m > 0
    diff = (_zero_masked(teacher_logprobs, valid) - _zero_masked(student_logprobs, valid)).detach()
    return diff * m


def mopd_loss(
    logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    reward_advantages: torch.Tensor | None = None,
    reward_weight: float = 0.0,
    distill_weight: float = 1.0,
    loss_agg: str = "token-mean",
    is_weights: torch.Tensor | None = None,
    behavior_logprobs: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MOPD as a policy-gradient loss, optionally mixed with a sequence-level RL reward advantage.

        A_it = distill_weight · sg(log π_T(y_it) − log π_S(y_it)) + reward_weight · A^R_i
        ℓ_it = −w_it · A_it · log π_S(y_it)

    sg = stop-gradient (`mopd_token_advantages`), A^R = ``reward_advantages`` [B] (e.g. `group_advantages`
    of verifiable rewards), w = optional detached ``is_weights`` [B, T] for off-policy rollouts. The gradient
    −A ∇log π_S is the REINFORCE estimator of ∇(distill_weight · (−KL(π_S‖π_T)) per token + reward term), as in
    on-policy distillation with a per-token reward. ``logprobs`` [B, T] is the student's log-prob of its own
    sampled tokens and carries the gradient; ``teacher_logprobs`` [B, T] comes from the prompt's domain teacher.

    Off-policy rollouts (asynchronous, sampled by an older student π_b): pass ``behavior_logprobs`` [B, T],
    log π_b of the sampled tokens. The distillation advantage then uses the sampling policy's log-prob,
    A_it = distill_weight · (log π_T(y_it) − log π_b(y_it)) + reward_weight · A^R_i (the reverse-KL estimate
    of the policy that actually sampled y), and the loss is `grpo_loss`'s clipped surrogate with ratio
    ρ = π_S / π_b (``clip_eps`` / ``clip_eps_high``; no KL term): its gradient at ρ = 1 is the on-policy one,
    −A ∇log π_S, and tokens already moved beyond the clip range get none. Stats then add ``clip_frac`` and
    ``ratio_mean``.

    Returns (loss, stats): ``reverse_kl`` = mean over valid tokens of log π_S − log π_T (π_b − π_T when
    behaviour log-probs are given: the estimate being minimised), ``advantage_mean`` = mean total advantage
    over valid tokens; all detached.
    """
    if behavior_logprobs is not None:
        _require_shape("behavior_logprobs", behavior_logprobs, logprobs.shape)
    sampler = logprobs if behavior_logprobs is None else behavior_logprobs
    adv = mopd_token_advantages(sampler, teacher_logprobs, mask)
    m = _as_float_mask(mask, logprobs)
    valid = m > 0
    logprobs = _zero_masked(logprobs, valid)
    total = distill_weight * adv
    if reward_advantages is not None:
        _require_shape("reward_advantages", reward_advantages, logprobs.shape[:1])
        total = total + reward_weight * reward_advantages.detach().to(logprobs.dtype)[:, None]
    elif reward_weight != 0.0:
        raise ValueError("reward_advantages is required when reward_weight != 0")
    if is_weights is not None:
        _require_shape("is_weights", is_weights, logprobs.shape)
    stats = {"reverse_kl": _masked_mean(-adv, m), "advantage_mean": _masked_mean(total, m)}
    if behavior_logprobs is not None:
        loss, pg = grpo_loss(logprobs, behavior_logprobs, None, total, mask, clip_eps=clip_eps,
                             clip_eps_high=clip_eps_high, loss_agg=loss_agg, is_weights=is_weights)  # fmt: skip
        return loss, {**stats, "clip_frac": pg["clip_frac"], "ratio_mean": pg["ratio_mean"]}
    per_token = -total * logprobs
    if is_weights is not None:
        per_token = per_token * _zero_masked(is_weights.detach(), valid)
    loss = aggregate_token_loss(per_token, m, loss_agg)
    return loss, stats
