"""kernels/cpu_amx.c: float32 matrix products on AMX tiles, or AVX512-BF16 dot products, under torch's reduced
matmul precisions. Each test runs on every kernel this CPU has (an AMX CPU has both).

Reference: float64. The bound is the split's: with v = hi + lo + e (hi, lo bfloat16, round-to-nearest-even,
u = 2⁻⁸), |lo| ≤ u·|v| and |e| ≤ u²·|v|, so "high" (hi·hi + lo·hi + hi·lo) drops terms of at most 3u²·|x||w| per
product, "medium" (hi·hi) at most 2u·|x||w|; a bfloat16 weight is exact (its lo is 0), leaving x's share. The
float32 accumulation of K products adds K·2⁻²⁴ of Σ|x||w|. The test asserts every output element against that
bound times |x|·|w| (a 1.5 margin), on shapes with row, K and column tails and more than one column chunk.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nemotron3.kernels import native
from nemotron3.model import fused
from tests.kernels.test_native import k_major

KINDS = [k for k, here in (("amx", native.amx_available()), ("avx512_bf16", native.bf16_dot_available())) if here]
U = 2.0**-8
DROPPED = {("high", torch.float32): 3 * U * U, ("high", torch.bfloat16): U * U,
           ("medium", torch.float32): 2 * U + U * U, ("medium", torch.bfloat16): U}  # fmt: skip


@pytest.fixture(params=["amx", "avx512_bf16"])
def kind(request, monkeypatch):
    """One bf16 product kernel, taking every precision and row count: the kernel, not the policy."""
    if request.param not in KINDS:
        pytest.skip(f"no {request.param} here (CPU, compiler or kernel)")
    monkeypatch.setattr(native, "AMX_MIN_ROWS_ROW_MAJOR", native.AMX_MIN_ROWS)
    monkeypatch.setattr(native, "DOT_PRECISIONS", ("high", "medium"))
    native.allow_amx(request.param == "amx")
    assert native.bf16_matmul_kind() == request.param
    yield request.param
    native.allow_amx(True)


@pytest.mark.parametrize(("M", "K", "N"), [(256, 50, 70), (300, 96, 600), (257, 1024, 33), (512, 33, 1030)])
@pytest.mark.parametrize("precision", ["high", "medium"])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=["f32w", "bf16w"])
@pytest.mark.parametrize("layout", ["k_major", "row_major"])
def test_matmul_bf16_is_within_the_split_bound_of_float64(M, K, N, precision, w_dtype, layout, kind):
    g = torch.Generator().manual_seed(M * K + N)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g).to(w_dtype)
    w = k_major(w) if layout == "k_major" else w
    bias = torch.randn(N, generator=g)
    for b in (None, bias):
        out = native.matmul_bf16(x, w, b, precision)
        assert out is not None and out.shape == (M, N) and out.dtype == torch.float32
        x64, w64 = x.double(), w.double()
        ref = x64 @ w64.t() + (0 if b is None else b.double())
        scale = x64.abs() @ w64.abs().t()
        tol = 1.5 * (DROPPED[precision, w_dtype] + K * 2.0**-24) * scale + 1e-30
        err = (out.double() - ref).abs()
        assert (err <= tol).all(), f"{precision} {w_dtype}: worst err/bound {(err / tol).max():.3g}"


def test_high_is_closer_than_medium_and_float32_closer_still(kind):
    """The bound above is not loose enough to hide a dropped term: the three precisions order as they should."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(256, 512, generator=g), k_major(torch.randn(128, 512, generator=g))
    ref = x.double() @ w.double().t()
    err = {p: (native.matmul_bf16(x, w, None, p).double() - ref).abs().max().item() for p in ("high", "medium")}
    err["highest"] = (F.linear(x, w).double() - ref).abs().max().item()
    assert err["highest"] < err["high"] < err["medium"] / 50


def test_matmul_bf16_reads_batched_rows_a_fused_storage_slice_and_an_expert_of_a_stack(kind):
    g = torch.Generator().manual_seed(3)
    store = torch.randn(64, 300, generator=g)  # [K, Σ N_i], as model/fused.py stacks matrices
    w = store[:, 40:250].t()  # [210, 64], stride (1, 300)
    x = torch.randn(1, 260, 64, generator=g)
    out = native.matmul_bf16(x, w, None, "high")
    assert out is not None and out.shape == (1, 260, 210)
    ref = x.double() @ w.double().t()
    assert ((out.double() - ref).abs() <= 1e-4 * (x.double().abs() @ w.double().abs().t())).all()
    into = torch.empty(1, 260, 210)
    assert native.matmul_bf16(x, w, None, "high", out=into) is into and torch.equal(into, out)
    with pytest.raises(ValueError, match="out must be"):
        native.matmul_bf16(x, w, None, "high", out=torch.empty(260, 210))
    stack = torch.randn(4, 48, 64, generator=g)  # [E, out, in], as Experts holds up_proj
    out = native.matmul_bf16(x[0], stack[2], None, "high")
    ref = x[0].double() @ stack[2].double().t()
    assert ((out.double() - ref).abs() <= 1e-4 * (x[0].double().abs() @ stack[2].double().abs().t())).all()


@pytest.mark.skipif(not native.available(), reason="native kernels not built")
@pytest.mark.parametrize("allow_amx", [True, False], ids=["amx_allowed", "amx_disallowed"])
def test_matmul_bf16_declines_what_it_does_not_take(allow_amx):
    native.allow_amx(allow_amx)
    try:
        kind = native.bf16_matmul_kind()
        precision = "high" if kind == "amx" else "medium"  # without AMX, "high" stays float32 (DOT_PRECISIONS)
        least = native.AMX_MIN_ROWS if kind == "amx" else native.DOT_MIN_ROWS
        x = torch.randn(least, 32)
        w = k_major(torch.randn(16, 32))
        assert native.matmul_bf16(x, w, None, "highest") is None  # float32 stays with MKL
        assert (native.matmul_bf16(x, w, None, precision) is not None) == (kind is not None)
        assert native.matmul_bf16(x[:-1], w, None, precision) is None  # too few rows to repay the packing
        if kind == "avx512_bf16":
            assert native.matmul_bf16(x, w, None, "high") is None
        rows_major = torch.randn(16, 32)  # row-major packs transpose: on AMX they need AMX_MIN_ROWS_ROW_MAJOR rows
        big = torch.randn(native.AMX_MIN_ROWS_ROW_MAJOR, 32)
        assert (native.matmul_bf16(big[:-1], rows_major, None, precision) is None) == (kind != "avx512_bf16")
        assert (native.matmul_bf16(big, rows_major, None, precision) is not None) == (kind is not None)
        assert native.matmul_bf16(x, k_major(torch.randn(32, 32))[::2], None, precision) is None  # neither layout
        assert native.matmul_bf16(x.double(), w.double(), None, precision) is None
        assert native.matmul_bf16(x[:, :16], w, None, precision) is None  # K mismatch
        w.requires_grad_(True)
        assert native.matmul_bf16(x, w, None, precision) is None  # autograd records through w
        with torch.no_grad():
            assert (native.matmul_bf16(x, w, None, precision) is not None) == (kind is not None)
    finally:
        native.allow_amx(True)


@pytest.mark.skipif(not native.available(), reason="native kernels not built")
def test_fast_path_applies_the_precision_and_restores_it():
    """fused.linear is F.linear bit for bit under "highest" (the default) and after a nested reduced-precision
    block ends; inside one it takes the bf16 product where the CPU has one (AMX, or AVX512-BF16 for "medium")."""
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(300, 64, generator=g), k_major(torch.randn(48, 64, generator=g))
    exact = F.linear(x, w)
    with torch.inference_mode(), fused.fast_path():
        assert torch.equal(fused.linear(x, w), exact)
        with fused.fast_path("medium"):
            reduced = fused.linear(x, w)
        assert torch.equal(fused.linear(x, w), exact)
    assert torch.equal(reduced, exact) != (native.bf16_matmul_kind() is not None)
