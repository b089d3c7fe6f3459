"""Plain, slow, float64 reference kernels, written from the math in research/architecture.md.

These are deliberately the most literal transcription of the equations (explicit loops over time,
tokens and experts) so that they are easy to check by eye. The package's fast kernels are tested
against them in test_kernels.py. Nothing here is copied from transformers or from the package.

Shapes follow the package contract (nemotron3.model.mamba2 / moe):
    x (b, t, h, p), dt (b, t, h), A (h,), B and C (b, t, g, n), state (b, h, p, n).
Every function upcasts its inputs to float64 and returns float64 (indices: int64).
"""

from __future__ import annotations

import math

import torch

f64 = torch.float64


def _group_of_head(h_total: int, g: int) -> list[int]:
    """Head h reads B/C group h // (h_total / g): contiguous blocks of heads (§5.2 step 3, §13.4)."""
    per = h_total // g
    return [h // per for h in range(h_total)]


# --------------------------------------------------------------------------------------- Mamba-2


def ssm_step_ref(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence (§5.2 step 5), without the D skip. Does NOT modify `state`.

    state (b, h, p, n); x (b, h, p); dt (b, h); A (h,); B, C (b, g, n).
    S' = exp(Δ·A_h) · S + (Δ·x) ⊗ B_{group(h)};   y = S' · C_{group(h)}   (contract over n)
    Returns (y (b, h, p), new_state (b, h, p, n)), both float64.
    """
    state, x, dt, A, B, C = (v.to(f64) for v in (state, x, dt, A, B, C))
    b, h, p, _ = state.shape
    group = _group_of_head(h, B.shape[1])
    new_state = torch.empty_like(state)
    y = torch.empty(b, h, p, dtype=f64)
    for bi in range(b):
        for hi in range(h):
            gi = group[hi]
            decay = math.exp(float(dt[bi, hi]) * float(A[hi]))
            S = decay * state[bi, hi] + torch.outer(dt[bi, hi] * x[bi, hi], B[bi, gi])  # (p, n)
            new_state[bi, hi] = S
            y[bi, hi] = S @ C[bi, gi]
    return y, new_state


def ssm_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequential Mamba-2 recurrence over t steps (no chunks), without the D skip.

    S_t = exp(Δ_t A) S_{t−1} + (Δ_t x_t) ⊗ B_t,   y_t = S_t C_t,   S_{−1} = initial_state or 0.
    Returns (y (b, t, h, p), final_state (b, h, p, n)), float64.
    """
    b, t, h, p = x.shape
    n = B.shape[-1]
    state = torch.zeros(b, h, p, n, dtype=f64) if initial_state is None else initial_state.to(f64).clone()
    ys = []
    for ti in range(t):
        y, state = ssm_step_ref(state, x[:, ti], dt[:, ti], A, B[:, ti], C[:, ti])
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else torch.zeros(b, 0, h, p, dtype=f64)
    return y, state


def causal_conv1d_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv (§5.2 step 2), before the activation.

    out_t[c] = bias[c] + Σ_{j=0}^{k−1} w[c, j] · u_{t−k+1+j}[c], where u is the input preceded by the
    k−1 previous inputs held in conv_state (b, c, k−1) (zeros when None; column k−2 is the newest).
    x (b, t, c); weight (c, k). Returns (out (b, t, c), new_state (b, c, k−1) = last k−1 inputs of u).
    """
    b, t, c = x.shape
    k = weight.shape[-1]
    x, weight = x.to(f64), weight.to(f64)
    prev = torch.zeros(b, c, k - 1, dtype=f64) if conv_state is None else conv_state.to(f64)
    u = torch.cat([prev.transpose(1, 2), x], dim=1)  # (b, k−1+t, c): u[:, k−1+ti] is x[:, ti]
    out = torch.zeros(b, t, c, dtype=f64)
    for ti in range(t):
        for j in range(k):
            out[:, ti] += weight[:, j] * u[:, ti + j]  # u index (k−1+ti) − (k−1) + j
        if bias is not None:
            out[:, ti] += bias.to(f64)
    new_state = u[:, u.shape[1] - (k - 1) :].transpose(1, 2).contiguous()
    return out, new_state


# ------------------------------------------------------------------------------------------- MoE


def route_ref(
    logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grouped sigmoid router of §7, token by token, in float64 Python.

    1. s = sigmoid(logits)
    2. selection score s' = s + correction_bias (selection only)
    3. groups of E/n_group consecutive experts; group score = sum of its two best s'; keep the
       topk_group best groups (others are not selectable)
    4. pick the top_k selectable experts by s'
    5. w = s[picked]; if norm_topk_prob: w /= (Σw + 1e-20); w *= routed_scaling_factor
    Returns (weights (T, k) float64, indices (T, k) int64), experts in descending s' order.
    """
    logits = logits.to(f64)
    bias = correction_bias.to(f64)
    T, E = logits.shape
    per = E // n_group
    weights = torch.zeros(T, top_k, dtype=f64)
    indices = torch.zeros(T, top_k, dtype=torch.int64)
    for ti in range(T):
        s = [1.0 / (1.0 + math.exp(-float(v))) for v in logits[ti]]
        sel = [s[e] + float(bias[e]) for e in range(E)]
        group_score = []
        for gi in range(n_group):
            members = sorted(sel[gi * per : (gi + 1) * per], reverse=True)
            group_score.append(members[0] + members[1] if per >= 2 else members[0])
        kept_groups = sorted(range(n_group), key=lambda gi: group_score[gi], reverse=True)[:topk_group]
        eligible = [e for e in range(E) if e // per in kept_groups]
        picked = sorted(eligible, key=lambda e: sel[e], reverse=True)[:top_k]
        w = [s[e] for e in picked]
        if norm_topk_prob:
            total = sum(w) + 1e-20
            w = [v / total for v in w]
        weights[ti] = torch.tensor([v * routed_scaling_factor for v in w], dtype=f64)
        indices[ti] = torch.tensor(picked, dtype=torch.int64)
    return weights, indices


# ------------------------------------------------------------------------------------- attention


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int | None = None) -> torch.Tensor:
    """Naive causal softmax attention with GQA (§4), float64.

    q (b, nq, tq, d); k, v (b, nkv, tk, d); query head i uses KV head i // (nq / nkv). Query position
    qi sits at absolute position offset + qi and sees keys 0 … offset + qi (offset defaults to tk − tq,
    i.e. the queries are the last tq positions). Scale d^−0.5. Returns (b, nq, tq, d).
    """
    q, k, v = (t.to(f64) for t in (q, k, v))
    b, nq, tq, d = q.shape
    nkv, tk = k.shape[1], k.shape[2]
    if offset is None:
        offset = tk - tq
    rep = nq // nkv
    out = torch.zeros(b, nq, tq, d, dtype=f64)
    for bi in range(b):
        for hi in range(nq):
            kv = hi // rep
            for qi in range(tq):
                last = offset + qi  # last visible key
                scores = (k[bi, kv, : last + 1] @ q[bi, hi, qi]) / math.sqrt(d)
                p = torch.softmax(scores, dim=0)
                out[bi, hi, qi] = p @ v[bi, kv, : last + 1]
    return out
