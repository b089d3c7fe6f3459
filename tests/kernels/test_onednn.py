"""oneDNN's float32 GEMM (nemotron3/kernels/onednn.py) against float64, and when the engine's linear takes it.

A float32 product of K terms has error ≲ √K·u·Σ|x_i·w_i| in practice (u = 2^-24); at K ≤ 1,100 that is ≲ 2e-6
of Σ|x_i·w_i|. We allow 1e-5 of it elementwise: a wrong row, a padding row leaking in or a transposed weight
gives errors of order 1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nemotron3.kernels import onednn
from nemotron3.model import fused

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN linear")
f64 = torch.float64


def assert_like_float64(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    ref = x.to(f64) @ w.to(f64).T + (0 if b is None else b.to(f64))
    scale = x.abs().to(f64) @ w.abs().to(f64).T + (0 if b is None else b.abs().to(f64))
    assert y.shape == ref.shape and y.dtype == torch.float32
    err = ((y.to(f64) - ref).abs() / scale).max().item()
    assert err < 1e-5, f"oneDNN linear: {err:.2e} of Σ|x·w| from float64"


@needs_onednn
@pytest.mark.parametrize(
    ("rows", "K", "N", "layout", "bias"),
    [
        (512, 96, 80, "k-major", False),  # a multiple of ROW_STEP: no padding
        (531, 130, 72, "k-major", True),  # 13 padding rows, K and N not multiples of 16
        (700, 64, 200, "row-major", False),  # the stacked experts' row-major [N, K] slices
        (1029, 1100, 48, "k-major", True),  # K > 1,024
    ],
)
def test_linear_matches_float64(rows, K, N, layout, bias):
    g = torch.Generator().manual_seed(rows + K + N)
    x = torch.randn(rows, K, generator=g)
    w = torch.randn(N, K, generator=g)
    if layout == "k-major":
        w = w.t().contiguous().t()  # the engine's Linear storage (engine/runner.py, transpose_linear_storage)
    b = torch.randn(N, generator=g) if bias else None
    y = onednn.linear(x, w, b)
    assert y is not None and y.is_contiguous()
    assert_like_float64(y, x, w, b)


@needs_onednn
def test_leading_dimensions_are_kept():
    x = torch.randn(1, 600, 32)
    w = torch.randn(40, 32)
    y = onednn.linear(x, w)
    assert y is not None and y.shape == (1, 600, 40)
    assert_like_float64(y[0], x[0], w, None)


@needs_onednn
def test_row_counts_reach_onednn_as_multiples_of_the_step(monkeypatch):
    """Padding bounds how many primitives oneDNN builds: every row count it sees is a multiple of ROW_STEP,
    and the zero rows it computes never reach the result."""
    seen = []
    real = onednn._op

    def spy(x, *args):
        seen.append(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(onednn, "_op", spy)
    for rows in (512, 513, 543, 544, 1000):
        x, w = torch.randn(rows, 24), torch.randn(16, 24)
        y = onednn.linear(x, w)
        assert y is not None and y.shape == (rows, 16)
        assert_like_float64(y, x, w, None)
    assert seen == [512, 544, 544, 544, 1024]


@needs_onednn
def test_declines_what_it_does_not_serve():
    """None (the caller runs F.linear) below MIN_ROWS, for other dtypes, a strided x, autograd on any operand, or when
    off."""
    w = torch.randn(8, 16)
    x = torch.randn(onednn.MIN_ROWS, 16)
    assert onednn.linear(x[:-1], w) is None
    assert onednn.linear(x.double(), w.double()) is None
    assert onednn.linear(x.bfloat16(), w.bfloat16()) is None
    assert onednn.linear(torch.randn(onednn.MIN_ROWS, 32)[:, :16], w) is None
    assert onednn.linear(x, w, torch.zeros(8, requires_grad=True)) is None  # a bias that records autograd
    assert onednn.linear(x.requires_grad_(), w) is None
    x = x.detach()
    previous = onednn.enable(False)
    try:
        assert onednn.linear(x, w) is None
    finally:
        onednn.enable(previous)
    assert onednn.linear(x, w) is not None


@needs_onednn
def test_the_engine_linear_takes_onednn_inside_the_fast_path_only(monkeypatch):
    """fused.linear (every projection of the engine's forward) sends many float32 rows to oneDNN inside the
    fast path; training and plain forwards outside it keep F.linear, so they stay bit-identical to torch."""
    calls = []
    real = onednn._op

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(onednn, "_op", spy)
    x = torch.randn(640, 48)
    w = torch.randn(32, 48).t().contiguous().t()
    assert torch.equal(fused.linear(x, w), F.linear(x, w)) and not calls
    with torch.no_grad(), fused.fast_path():
        y = fused.linear(x, w)
        assert calls == [(640, 48)]
        fused.linear(x[: onednn.MIN_ROWS - 1], w)  # fewer rows: MKL (or the native GEMV)
        assert len(calls) == 1
    assert_like_float64(y, x, w, None)


@needs_onednn
def test_a_failing_op_turns_the_path_off_with_a_warning(monkeypatch):
    """If oneDNN cannot run the product on this CPU, the caller gets None (then MKL) and a warning, once."""

    def broken(*args):
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(onednn, "_op", broken)
    previous = onednn.enable(True)
    try:
        with pytest.warns(UserWarning, match="oneDNN linear failed"):
            assert onednn.linear(torch.randn(512, 8), torch.randn(4, 8)) is None
        assert not onednn.available()
    finally:
        onednn.enable(previous)


@needs_onednn
def test_an_engine_prefill_through_onednn_decodes_as_one_through_mkl(monkeypatch):
    """Three prompts prefilled in one 600-row step take oneDNN for every projection; the greedy tokens are MKL's,
    and the chosen tokens' logprobs agree to float32 rounding (measured: equal at these widths, K ≤ 64; we allow
    1e-4). A wrong or shifted row changes the tokens."""
    import copy

    from nemotron3 import LLM, SamplingParams
    from tests.engine.test_engine import CONFIG, wide_random_model

    model = wide_random_model(5)
    g = torch.Generator().manual_seed(3)
    prompts = [
        {"prompt_token_ids": torch.randint(3, CONFIG.vocab_size, (n,), generator=g).tolist()} for n in (300, 200, 100)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=0)
    calls = []
    real = onednn._op

    def spy(*args):
        calls.append(args[0].shape[0])
        return real(*args)

    monkeypatch.setattr(onednn, "_op", spy)
    results = {}
    for on in (True, False):
        previous = onednn.enable(on)
        try:
            llm = LLM(copy.deepcopy(model), kv_cache_memory_bytes=8 << 20, max_num_batched_tokens=1024)
            outs = llm.generate(prompts, params)
        finally:
            onednn.enable(previous)
        tokens = [o.outputs[0].token_ids for o in outs]
        logps = [lp[t].logprob for o in outs for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
        results[on] = tokens, torch.tensor(logps, dtype=f64)
        if on:
            assert 608 in calls and all(r % onednn.ROW_STEP == 0 for r in calls), calls  # 600 rows → 608
            calls.clear()
    assert not calls  # off: MKL only
    assert results[True][0] == results[False][0]
    assert (results[True][1] - results[False][1]).abs().max().item() < 1e-4
