"""Float32 GEMMs of many rows through torch's oneDNN matmul instead of its default BLAS (MKL).

On the project's AMD EPYC (Zen 4) machine, MKL's float32 GEMM reaches 150-200 GFLOP/s at prefill shapes and
oneDNN's 190-225 (2 threads, this CPU's FMA peak ~215; benchmarks/bench_kernels.py), so prefill's dense
projections run ~1.1-1.3x faster. Same float32 math, another summation order: errors up to ~3e-7 of Σ|x·w|
(MKL's: ~1e-7; tests/kernels/test_onednn.py).

oneDNN builds (JIT-compiles) a primitive for each new (rows, K, N), 0.4-0.9 ms each, and keeps ~1,024 of them.
A server's steps have every row count from 1 to the token budget, so rows are padded up to a multiple of ROW_STEP
(at most 31 zero rows: <= 24 % at MIN_ROWS, <= 6 % from 512): a model then needs at most budget / ROW_STEP
primitives per weight shape, built once. Whole prefill with MIN_ROWS 128 against 512, interleaved: 1.08-1.14x
for 128-384-token prompts, 0.98-1.02x at 1024-2048 (the experts' 128-511-row products gain nothing padded).
Below MIN_ROWS, MKL runs.
"""

from __future__ import annotations

import warnings

import torch

MIN_ROWS = 128  # rows from which linear() runs; below, MKL (padding would add over 24 % more rows)
ROW_STEP = 32  # rows are padded up to a multiple of this: one primitive per 32 row counts (see above)

_op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_built = torch.backends.mkldnn.is_available()  # fixed for the process: asked once, not per product
_enabled = True


def available() -> bool:
    """Whether this torch build has oneDNN's linear (x86 CPU builds do) and it is enabled."""
    return _enabled and _built and _op is not None


def enable(on: bool) -> bool:
    """Turn the oneDNN path on or off (benchmarks' A/B, tests); returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(on)
    return previous


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """F.linear(x, weight, bias) through oneDNN for float32 CPU operands with at least MIN_ROWS rows and no
    autograd recording, else None (the caller runs torch's own). x [..., K] contiguous; weight [N, K] in any
    strides (the engine's K-major views included; oneDNN packs it per call); bias [N] or None."""
    if not available() or x.dtype is not torch.float32 or weight.dtype is not torch.float32 or weight.dim() != 2:
        return None
    if bias is not None and (bias.dtype is not torch.float32 or bias.dim() != 1):
        return None
    K = weight.shape[1]
    if x.dim() < 2 or x.shape[-1] != K or not K or not x.is_contiguous() or not (x.is_cpu and weight.is_cpu):
        return None
    rows = x.numel() // K
    operands = (x, weight) if bias is None else (x, weight, bias)
    if rows < MIN_ROWS or (torch.is_grad_enabled() and any(t.requires_grad for t in operands)):
        return None  # the op records no autograd graph
    x2 = x.view(rows, K)
    padded = -(-rows // ROW_STEP) * ROW_STEP
    if padded != rows:
        xp = x2.new_empty(padded, K)
        xp[:rows] = x2
        xp[rows:] = 0.0  # zeros, not garbage: no NaN or denormal rows inside the product
        x2 = xp
    try:
        out = _op(x2, weight, bias, "none", [], "")
    except RuntimeError as e:  # a build whose oneDNN lacks this op for the CPU: say so once, then MKL
        enable(False)
        warnings.warn(f"oneDNN linear failed ({e}); float32 GEMMs use torch's default BLAS from now on", stacklevel=2)
        return None
    return out[:rows].view(*x.shape[:-1], weight.shape[0])
