"""The package's fast kernels against the plain float64 references in tests/model/reference.py.

Inputs are drawn in float32 from a seeded generator; the reference receives exactly the same
float32 values (upcast), so any difference is the fast kernel's own float32 arithmetic.

Tolerances (float32 kernel vs float64 reference). float32 unit roundoff is u = 2^-24 ≈ 6e-8.
* Mamba-2 scan: an output y_t = Σ_{j≤t} (C_t·B_j) · exp(Σ_{j<i≤t} Δ_i A) · Δ_j x_j sums O(t·n) terms of
  size O(1), each a product of a few rounded factors: independent relative errors ~u that add in
  quadrature give ~u·few ≈ 1e-7 relative L2. The chunked kernel also forms each decay as
  exp(cs_l − cs_j) from float32 cumulative sums cs (|cs| ≲ |ΔA|·Q ≲ 40 here), which can add an
  absolute exponent error up to ~40·u ≈ 2.4e-6 on the few terms with the largest cs; those terms are
  already decayed by exp(−cs), so their share of the output is small. Measured over all cases below:
  ≤ 1.7e-7 relative L2 and ≤ 3.2e-7 relative max. We allow RTOL_SCAN = 2e-6 (≥ 6× margin) on the
  relative L2 and 10× that on the relative max; a wrong decay, group mapping or chunk boundary gives
  errors of order 1e-2 … 1.
* One recurrence step / conv1d: a handful of multiply-adds per output: measured ≤ 1.5e-7 (step) and
  ≤ 8.5e-8 (conv) relative; we allow 1e-6 (conv) and 1e-5 (the step, iterated 6 times on one state).
* Attention: softmax over ≤ 30 keys of d-term dot products: measured ≤ 1.8e-7 relative L2
  (4.7e-7 relative max); we allow 5e-6.
* Router: weights are sigmoid + one division, ≈ 1e-7 relative; we allow 1e-6 absolute on values ≤
  routed_scaling_factor (measured ≤ 2e-7). Selected expert sets must be identical except for tokens whose selection
  margin in the reference is below 1e-5 (a genuine near-tie that float32 may break either way).
All errors are measured as ‖ours − ref‖ / ‖ref‖ (relative L2 over the whole tensor) and, to catch a
single wrong element hidden in a large norm, max|ours − ref| / max|ref|.
"""

from __future__ import annotations

import math

import pytest
import torch

from nemotron3.model.mamba2 import causal_conv1d, ssd_chunk_scan, ssm_step
from nemotron3.model.moe import route
from tests.model.reference import attention_ref, causal_conv1d_ref, route_ref, ssm_scan_ref, ssm_step_ref

RTOL_SCAN = 2e-6
RTOL_SMALL = 1e-6


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error, max-abs error relative to max |ref|) of ours vs a float64 reference."""
    ours, ref = ours.double(), ref.double()
    scale = ref.norm().item() or 1.0
    mscale = ref.abs().max().item() or 1.0
    return (ours - ref).norm().item() / scale, (ours - ref).abs().max().item() / mscale


def assert_close_rel(ours: torch.Tensor, ref: torch.Tensor, rtol: float, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    l2, mx = rel_err(ours, ref)
    assert l2 <= rtol and mx <= 10 * rtol, f"{what}: rel L2 err {l2:.3e}, rel max err {mx:.3e} (rtol {rtol:.0e})"


def scan_inputs(b, t, h, p, g, n, seed, init=False, dt_range=(1e-3, 0.5)):
    """Random Mamba-2 scan inputs in float32 (Δ already positive, A negative)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, p, generator=gen)
    lo, hi = dt_range
    dt = torch.exp(torch.rand(b, t, h, generator=gen) * (math.log(hi) - math.log(lo)) + math.log(lo))
    A = -torch.exp(torch.rand(h, generator=gen) * 2.5 - 1.0)  # A in [−e^1.5, −e^−1]
    B = torch.randn(b, t, g, n, generator=gen)
    C = torch.randn(b, t, g, n, generator=gen)
    state = torch.randn(b, h, p, n, generator=gen) if init else None
    return x, dt, A, B, C, state


# ----------------------------------------------------------------------------------- ssd_chunk_scan

# (b, t, h, p, g, n, chunk_size, initial_state?)
SCAN_CASES = [
    (2, 37, 4, 8, 2, 16, 8, False),  # chunk size does not divide T, n_groups > 1
    (1, 64, 4, 4, 1, 8, 16, False),  # chunk size divides T, one group
    (2, 23, 6, 8, 3, 4, 8, True),  # initial state, 3 groups of 2 heads
    (1, 1, 4, 8, 2, 8, 8, True),  # T = 1 through the chunked path
    (2, 5, 4, 8, 4, 8, 16, True),  # T < chunk size, one head per group
    (1, 45, 2, 4, 1, 8, 2, False),  # 23 chunks: more than one internal segment of chunks
    (1, 70, 4, 4, 2, 4, 4, True),  # 18 chunks with an initial state
    (2, 19, 8, 3, 2, 5, 7, True),  # odd everything
]


@pytest.mark.parametrize(
    "case", SCAN_CASES, ids=lambda c: "b{}t{}h{}p{}g{}n{}Q{}{}".format(*c[:7], "init" if c[7] else "")
)
@pytest.mark.parametrize("seed", [0, 1])
def test_ssd_chunk_scan_matches_sequential_recurrence(case, seed):
    b, t, h, p, g, n, q, init = case
    x, dt, A, B, C, state = scan_inputs(b, t, h, p, g, n, seed, init)
    state_copy = None if state is None else state.clone()
    y, final = ssd_chunk_scan(x, dt, A, B, C, q, initial_state=state)
    y_ref, final_ref = ssm_scan_ref(x, dt, A, B, C, state)
    assert y.dtype == torch.float32 and final.dtype == torch.float32
    assert_close_rel(y, y_ref, RTOL_SCAN, "y")
    assert_close_rel(final, final_ref, RTOL_SCAN, "final_state")
    if state is not None:  # a functional kernel: the initial state it was given is left alone
        assert torch.equal(state, state_copy), "ssd_chunk_scan modified initial_state in place"


def test_ssd_chunk_scan_small_dt_and_strong_decay():
    """Δ spanning 1e-4 … 3 with |A| up to e^1.5: decays from ~1 to exp(−13) within one step."""
    x, dt, A, B, C, state = scan_inputs(2, 41, 4, 8, 2, 8, seed=7, init=True, dt_range=(1e-4, 3.0))
    y, final = ssd_chunk_scan(x, dt, A, B, C, 16, initial_state=state)
    y_ref, final_ref = ssm_scan_ref(x, dt, A, B, C, state)
    assert_close_rel(y, y_ref, RTOL_SCAN, "y")
    assert_close_rel(final, final_ref, RTOL_SCAN, "final_state")


@pytest.mark.parametrize("split", [1, 8, 13, 30])
def test_ssd_chunk_scan_continues_from_its_final_state(split):
    """scan(x[:s]) then scan(x[s:], initial_state=final) == scan(x): chunked prefill is exact."""
    x, dt, A, B, C, _ = scan_inputs(2, 31, 4, 8, 2, 8, seed=3)
    y, final = ssd_chunk_scan(x, dt, A, B, C, 8)
    y1, s1 = ssd_chunk_scan(x[:, :split], dt[:, :split], A, B[:, :split], C[:, :split], 8)
    y2, s2 = ssd_chunk_scan(x[:, split:], dt[:, split:], A, B[:, split:], C[:, split:], 8, initial_state=s1)
    assert_close_rel(torch.cat([y1, y2], 1), y.double(), RTOL_SCAN, "y split")
    assert_close_rel(s2, final.double(), RTOL_SCAN, "final_state split")


def test_ssd_chunk_scan_does_not_depend_on_chunk_size():
    x, dt, A, B, C, state = scan_inputs(1, 50, 4, 8, 2, 8, seed=4, init=True)
    y_ref, s_ref = ssd_chunk_scan(x, dt, A, B, C, 50, initial_state=state)  # one chunk
    for q in (1, 3, 8, 16, 64):
        y, s = ssd_chunk_scan(x, dt, A, B, C, q, initial_state=state)
        assert_close_rel(y, y_ref.double(), RTOL_SCAN, f"y chunk {q}")
        assert_close_rel(s, s_ref.double(), RTOL_SCAN, f"state chunk {q}")


# ----------------------------------------------------------------------------------------- ssm_step


@pytest.mark.parametrize("b,h,p,g,n", [(2, 4, 8, 2, 16), (1, 6, 4, 3, 8), (3, 8, 3, 1, 5), (2, 4, 4, 4, 4)])
def test_ssm_step_matches_reference_and_updates_state_in_place(b, h, p, g, n):
    x, dt, A, B, C, state = scan_inputs(b, 6, h, p, g, n, seed=11, init=True)
    ref_state = state.double()
    storage = state.data_ptr()
    for t in range(6):  # several consecutive steps on the same state tensor
        y = ssm_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        y_ref, ref_state = ssm_step_ref(ref_state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        assert y.shape == (b, h, p) and y.dtype == torch.float32
        assert_close_rel(y, y_ref, RTOL_SMALL * 10, f"y step {t}")
        assert_close_rel(state, ref_state, RTOL_SMALL * 10, f"state step {t}")
    assert state.data_ptr() == storage


def test_ssm_steps_equal_chunk_scan():
    """T single steps from an initial state == one chunked scan from it (decode == prefill)."""
    x, dt, A, B, C, state = scan_inputs(2, 21, 4, 8, 2, 8, seed=12, init=True)
    y_scan, final = ssd_chunk_scan(x, dt, A, B, C, 8, initial_state=state.clone())
    s = state.clone()
    ys = torch.stack([ssm_step(s, x[:, t], dt[:, t], A, B[:, t], C[:, t]) for t in range(21)], 1)
    assert_close_rel(ys, y_scan.double(), RTOL_SCAN, "steps vs scan")
    assert_close_rel(s, final.double(), RTOL_SCAN, "state steps vs scan")


# ------------------------------------------------------------------------------------ causal_conv1d

# (b, t, c, k, bias?, state?)
CONV_CASES = [
    (2, 17, 12, 4, True, False),
    (2, 17, 12, 4, True, True),
    (1, 1, 12, 4, True, True),  # decode: one token continuing a state
    (3, 1, 5, 4, False, False),  # one token from zeros, no bias
    (2, 2, 7, 4, True, True),  # fewer new tokens than k − 1: the new state mixes old state and input
    (2, 9, 6, 2, False, True),  # k = 2
    (1, 6, 3, 5, True, True),
]


@pytest.mark.parametrize(
    "case",
    CONV_CASES,
    ids=lambda c: "b{}t{}c{}k{}{}{}".format(*c[:4], "-bias" if c[4] else "", "-state" if c[5] else ""),
)
def test_causal_conv1d_matches_reference(case):
    b, t, c, k, has_bias, has_state = case
    gen = torch.Generator().manual_seed(t * 100 + c)
    x = torch.randn(b, t, c, generator=gen)
    w = torch.randn(c, k, generator=gen)
    bias = torch.randn(c, generator=gen) if has_bias else None
    state = torch.randn(b, c, k - 1, generator=gen) if has_state else None
    out, new_state = causal_conv1d(x, w, bias, state)
    out_ref, state_ref = causal_conv1d_ref(x, w, bias, state)
    assert_close_rel(out, out_ref, RTOL_SMALL, "conv out")
    assert new_state.shape == (b, c, k - 1)
    # the new state is a copy of inputs, so it must be exact
    assert torch.equal(new_state.double(), state_ref), "conv new_state is not the last k−1 inputs"


def test_causal_conv1d_continues_from_its_state():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 23, 10, generator=gen)
    w, bias = torch.randn(10, 4, generator=gen), torch.randn(10, generator=gen)
    full, full_state = causal_conv1d(x, w, bias)
    outs, state = [], None
    for s, e in [(0, 5), (5, 6), (6, 7), (7, 15), (15, 23)]:  # chunks and single tokens
        o, state = causal_conv1d(x[:, s:e], w, bias, state)
        outs.append(o)
    assert_close_rel(torch.cat(outs, 1), full.double(), RTOL_SMALL, "conv pieces")
    assert torch.equal(state, full_state)


# -------------------------------------------------------------------------------------------- route

# (T, E, k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)
ROUTE_CASES = [
    (64, 8, 2, 1, 1, True, 1.0),
    (64, 8, 2, 4, 2, True, 2.5),  # group-limited (LatentMoE test config)
    (64, 16, 4, 4, 1, False, 1.0),  # one group kept: all k experts from one group; no renormalisation
    (64, 32, 6, 8, 3, True, 5.0),
    (1, 8, 1, 2, 1, True, 1.0),
    (33, 128, 6, 1, 1, True, 2.5),  # Nano-like
]


def _boundary_margin(sel: torch.Tensor, k: int, n_group: int, topk_group: int) -> torch.Tensor:
    """Per token, the smallest gap (in float64 selection scores) that decides the reference's choice."""
    T, E = sel.shape
    per = E // n_group
    margins = torch.full((T,), math.inf, dtype=torch.float64)
    for ti in range(T):
        s = sel[ti]
        if n_group > 1:
            gs = s.view(n_group, per).topk(2, dim=-1).values.sum(-1).sort(descending=True).values
            if topk_group < n_group:
                margins[ti] = min(margins[ti], (gs[topk_group - 1] - gs[topk_group]).item())
            keep = s.view(n_group, per).topk(2, -1).values.sum(-1).topk(topk_group).indices
            s = s.view(n_group, per)[keep].reshape(-1)
        v = s.sort(descending=True).values
        if k < v.numel():
            margins[ti] = min(margins[ti], (v[k - 1] - v[k]).item())
    return margins


@pytest.mark.parametrize(
    "case", ROUTE_CASES, ids=lambda c: "T{}E{}k{}g{}tg{}{}s{}".format(*c[:5], "norm" if c[5] else "", c[6])
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_route_matches_reference(case, seed):
    T, E, k, n_group, topk_group, norm, scale = case
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen) * 2.0
    bias = torch.randn(E, generator=gen) * 0.1  # comparable to score gaps: it changes some choices
    weights, indices = route(logits, bias, k, n_group, topk_group, norm, scale)
    w_ref, i_ref = route_ref(logits, bias, k, n_group, topk_group, norm, scale)
    assert weights.shape == (T, k) and indices.shape == (T, k)
    assert weights.dtype == torch.float32 and indices.dtype == torch.int64
    sel = torch.sigmoid(logits.double()) + bias.double()
    clear = _boundary_margin(sel, k, n_group, topk_group) > 1e-5
    assert clear.float().mean() > 0.9, "too many near-ties: the test would not test anything"
    for ti in range(T):
        if not clear[ti]:
            continue
        assert set(indices[ti].tolist()) == set(i_ref[ti].tolist()), (
            f"token {ti}: experts {sorted(indices[ti].tolist())}, reference {sorted(i_ref[ti].tolist())}"
        )
        ours = dict(zip(indices[ti].tolist(), weights[ti].tolist()))
        for e, w in zip(i_ref[ti].tolist(), w_ref[ti].tolist()):
            assert abs(ours[e] - w) <= RTOL_SMALL * max(scale, 1.0), f"token {ti} expert {e}: weight {ours[e]} vs {w}"
    if n_group == 1 and k < E:  # the bias must actually have changed some selections (selection-only bias)
        unbiased = torch.sigmoid(logits).topk(k, -1).indices.sort(-1).values
        assert (unbiased != i_ref.sort(-1).values).any() or T == 1


def test_route_bias_selects_but_does_not_weight():
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(9))
    bias = torch.zeros(8)
    bias[[1, 5]] = 10.0  # forces experts 1 and 5
    w, idx = route(logits, bias, 2, 1, 1, False, 3.0)
    assert (idx.sort(-1).values == torch.tensor([1, 5])).all()
    expected = 3.0 * torch.sigmoid(logits).gather(1, idx)  # un-biased sigmoid × routed_scaling_factor
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-6)


def test_route_group_limit_excludes_other_groups():
    logits = torch.randn(7, 16, generator=torch.Generator().manual_seed(10))
    bias = torch.zeros(16)
    bias[9] = 10.0  # group 2 of 4 (experts 8..11) wins the only kept group
    w, idx = route(logits, bias, 3, 4, 1, True, 1.0)
    assert ((idx >= 8) & (idx < 12)).all(), idx
    assert (idx == 9).any(-1).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(7), rtol=1e-6, atol=1e-6)  # renormalised


# ---------------------------------------------------------------------------------------- attention


def _causal_attention():
    mod = pytest.importorskip("nemotron3.model.attention")
    if not hasattr(mod, "causal_attention"):
        pytest.skip("nemotron3.model.attention.causal_attention not present")
    return mod.causal_attention


# (b, nq, nkv, tq, tk, d)
ATTN_CASES = [
    (2, 4, 2, 13, 13, 16),  # prefill, GQA 2
    (2, 4, 4, 9, 9, 8),  # MHA
    (1, 8, 2, 1, 21, 16),  # decode: one query after 20 cached keys
    (2, 6, 2, 7, 30, 12),  # chunk of 7 after 23 cached keys (offset)
    (1, 4, 1, 5, 5, 6),  # MQA
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "b{}q{}kv{}tq{}tk{}d{}".format(*c))
def test_causal_attention_matches_reference(case):
    attn = _causal_attention()
    b, nq, nkv, tq, tk, d = case
    gen = torch.Generator().manual_seed(tq * 7 + tk)
    q = torch.randn(b, nq, tq, d, generator=gen)
    k = torch.randn(b, nkv, tk, d, generator=gen)
    v = torch.randn(b, nkv, tk, d, generator=gen)
    assert_close_rel(attn(q, k, v), attention_ref(q, k, v), RTOL_SMALL * 5, "attention")
