"""Shared storage for weight matrices that one GEMV can apply together (inference only).

Matrices that read the same input (q/k/v; router, latent-down and shared-up) are stacked along their output
rows; matrices whose outputs are summed (shared-down + latent-up) are stacked along their input columns and
applied to the concatenated inputs. The storage is K-major (transposed), the layout MKL streams fastest for
decode GEMVs (engine/runner.py, transpose_linear_storage), and every parameter becomes a view into it: values,
names, state_dict and in-place updates are unchanged, and the fused matrix sees every in-place update.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.kernels import native, onednn

_state = threading.local()


@contextmanager
def fast_path(matmul_precision: str = "highest") -> Iterator[None]:
    """Inside (this thread only): the engine's forward, which may use fused matrices and native kernels.

    Everything else (training, teacher scoring, a plain `model(ids)`) keeps the reference op sequence, so
    two forwards of the same model agree bit for bit whether autograd records or not. matmul_precision:
    torch.set_float32_matmul_precision's names; "high" / "medium" let prefill GEMMs run on AMX tiles
    (kernels/cpu_amx.c) where the CPU has them ("medium" also on AVX512-BF16 dot products), "highest" keeps
    float32 GEMMs."""
    previous = getattr(_state, "on", False), getattr(_state, "precision", "highest")
    _state.on, _state.precision = True, matmul_precision
    try:
        yield
    finally:
        _state.on, _state.precision = previous


def fast_path_on() -> bool:
    return getattr(_state, "on", False)


def fast_path_precision() -> str:
    """The float32 matmul precision the fast path runs under ("highest" outside it)."""
    return getattr(_state, "precision", "highest") if fast_path_on() else "highest"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the native decode GEMV (nemotron3/kernels) inside the engine's fast path when it
    applies (a few rows, float32 x, K-major float32 or bfloat16 weight), or its bf16 GEMM (AMX or AVX512-BF16)
    for many rows under a reduced matmul precision, or oneDNN's float32 GEMM for many rows (kernels/onednn.py);
    otherwise torch's own. A weight stored in another dtype than x (the engine's weight-only bf16,
    engine/runner.py) is widened exactly first."""
    if fast_path_on():
        out = native.linear(x, weight, bias)
        if out is None and _state.precision != "highest":
            out = native.matmul_bf16(x, weight, bias, _state.precision)
        if out is not None:
            return out
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)  # keeps the K-major strides
    if fast_path_on():
        out = onednn.linear(x, weight, bias)  # many float32 rows: oneDNN's GEMM (kernels/onednn.py)
        if out is not None:
            return out
    return F.linear(x, weight, bias)


def apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x), with a plain nn.Linear taking `linear` (quantized or hooked layers run as themselves)."""
    if type(module) is nn.Linear and fast_path_on() and not module._forward_hooks and not module._forward_pre_hooks:
        return linear(x, module.weight, module.bias)
    return module(x)


def stack_outputs(weights: list[torch.Tensor]) -> torch.Tensor:
    """Re-point weights [N_i, K] at one storage; returns the stacked [Σ N_i, K] matrix (a view)."""
    with torch.no_grad():
        store = torch.cat([w.t() for w in weights], dim=1).contiguous()  # [K, Σ N_i]
        start = 0
        for w in weights:
            w.data = store[:, start : start + w.shape[0]].t()
            start += w.shape[0]
    return store.t()


def stack_inputs(weights: list[torch.Tensor]) -> torch.Tensor:
    """Re-point weights [N, K_i] at one storage; returns the [N, Σ K_i] matrix that maps cat(inputs) to Σ outputs."""
    with torch.no_grad():
        store = torch.cat([w.t() for w in weights], dim=0).contiguous()  # [Σ K_i, N]
        start = 0
        for w in weights:
            w.data = store[start : start + w.shape[1]].t()
            start += w.shape[1]
    return store.t()


class FusedWeights:
    """Fused matrices plus where their parameters' data lived when fused, to notice a replaced parameter.

    `owners` are (module, parameter name) pairs; the check reads each module's current parameter, so that
    assigning a new Parameter or new `.data` (load_state_dict(assign=True) does) turns the fusion off."""

    def __init__(self, owners: list[tuple[nn.Module, str]], *matrices: torch.Tensor) -> None:
        self.owners = owners
        self.matrices = matrices
        self._ptrs = self._current()

    def _current(self) -> list[int]:
        return [module._parameters[name].data_ptr() for module, name in self.owners]

    def usable(self, x: torch.Tensor) -> bool:
        """True inside the engine's fast path, with no autograd recording, x float32, and no parameter
        replaced since fusing."""
        return (
            fast_path_on()
            and not torch.is_grad_enabled()
            and x.dtype == torch.float32
            and self._current() == self._ptrs
        )


def fusable(weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> bool:
    """Only bias-free matrices of one dtype, float32 or bfloat16, are fused. The fused path runs only on float32
    activations (`FusedWeights.usable`), so a fused router computes in float32 from its (widened) weight, as
    Router.forward does; a bfloat16 model runs unfused."""
    dtypes = {w.dtype for w in weights}
    return len(dtypes) == 1 and dtypes <= {torch.float32, torch.bfloat16} and all(b is None for b in biases)
