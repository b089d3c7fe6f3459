"""Fake quantization for training: NVFP4 / FP8 forward rounding with a straight-through estimator, and the
NVFP4 pretraining recipe's pieces as switchable options (research/nvfp4.md §7).

Two modes of `FakeQuantLinear`, chosen by `FakeQuantConfig.gradient`:

* QAT (gradient=None, research/nvfp4.md §7 (A)): y = F.linear(Q(x), Q(W), b), where Q quantizes and
  dequantizes with exactly the checkpoint numerics (nvfp4.py / fp8.py) and passes gradients straight
  through (identity), as ModelOpt's `pass_through_bwd`. After training, export with the real quantizer.
* NVFP4 training (gradient="nvfp4", §7 (B), arXiv 2509.25149): all three GEMMs take NVFP4 operands
  quantized along their own reduction dimension, emulated as quantize-dequantize then an fp32 matmul:
      Fprop  y  = Q(x) · Q_w(W)ᵀ                  x in 1x16 blocks, W in 1x16 or 16x16 tiles
      Dgrad  dx = Q_g(dy) · Q_w'(W)               dy along `out`; W' = the same tiles if 2-D, else 1x16 along `out`
      Wgrad  dW = Q_g(R(dyᵀ)) · Q(R(xᵀ))ᵀ         along tokens; R = optional random Hadamard transform
  Q_g uses stochastic rounding when enabled (elements only; block scales are always RNE).

Options, each measurably helpful at 12B in the paper (§7 items 1-4):
  weight_2d            16x16 weight tiles, so Fprop and Dgrad see the same quantized W
  rht                  16x16 random Hadamard transform on the two Wgrad inputs only, one sign vector per run
  stochastic_rounding  on gradients only (SR on forward tensors diverges)
  high_precision_layers(n)  which layers to leave unquantized: the last ~15 %
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.quant.fp8 import fp8_dequantize, fp8_quantize
from nemotron3.quant.nvfp4 import NVFP4_BLOCK, nvfp4_fake_quantize

QuantFormat = Literal["nvfp4", "fp8"]
_FORMATS = ("nvfp4", "fp8")

# Share of linear layers the NVFP4 recipe keeps in BF16, mostly at the end of the network (research/
# nvfp4.md §7 item 1: 12B first 2 + last 8 of 62 blocks = 16 %, 8B last 8 ≈ 15 %, Nemotron 3 Ultra the
# final 16 of 108 layers = 14.8 %, Super the last 14 of 88 = 15.9 %).
HIGH_PRECISION_FRACTION = 0.15
HADAMARD_SIZE = 16  # d = 16 (d = 4 worse, d = 128 marginally better: research/nvfp4.md §7 item 3)


@dataclass(frozen=True)
class FakeQuantConfig:
    """What a FakeQuantLinear quantizes. Defaults: NVFP4 weights only, plain STE (QAT)."""

    weight: QuantFormat | None = "nvfp4"
    input: QuantFormat | None = None
    gradient: Literal["nvfp4"] | None = None  # quantize the backward GEMMs' operands too (training recipe)
    weight_2d: bool = False  # 16x16 weight tiles (NVFP4 weights only)
    rht: bool = False  # random Hadamard transform on the Wgrad inputs (needs gradient="nvfp4")
    stochastic_rounding: bool = False  # for gradients (needs gradient="nvfp4")
    seed: int = 0  # RHT sign vector and stochastic-rounding stream
    input_scale: float | None = None  # static input global scale (NVFP4 amax/2688, FP8 amax/448); None = live amax

    def __post_init__(self) -> None:
        for field, value in (("weight", self.weight), ("input", self.input)):
            if value is not None and value not in _FORMATS:
                raise ValueError(f"FakeQuantConfig.{field} must be one of {_FORMATS} or None, got {value!r}")
        if self.gradient not in (None, "nvfp4"):
            raise ValueError(f"FakeQuantConfig.gradient must be 'nvfp4' or None, got {self.gradient!r}")
        if self.weight_2d and self.weight != "nvfp4":
            raise ValueError("weight_2d (16x16 tiles) applies to NVFP4 weights: set weight='nvfp4'")
        if (self.rht or self.stochastic_rounding) and self.gradient is None:
            raise ValueError("rht and stochastic_rounding act on the backward GEMMs: set gradient='nvfp4'")
        if self.input_scale is not None and (self.input is None or not self.input_scale > 0):
            raise ValueError("input_scale needs an input format and must be > 0")

    @classmethod
    def nvfp4_pretraining(cls, seed: int = 0) -> FakeQuantConfig:
        """The NVFP4 pretraining recipe of arXiv 2509.25149 / Nemotron 3 (W, x, dy all NVFP4, 2-D W, RHT, SR)."""
        return cls(weight="nvfp4", input="nvfp4", gradient="nvfp4", weight_2d=True, rht=True,
                   stochastic_rounding=True, seed=seed)  # fmt: skip


class _StraightThrough(torch.autograd.Function):
    """y = quantize(x) forward, dy/dx = identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantize) -> torch.Tensor:
        return quantize(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _qdq(x: torch.Tensor, fmt: QuantFormat, scale: float | None = None, block_rows: int = 1,
         generator: torch.Generator | None = None, stochastic: bool = False) -> torch.Tensor:  # fmt: skip
    """Quantize-dequantize without autograd; returns x's dtype. `scale`: the format's global/per-tensor scale."""
    if fmt == "nvfp4":
        return nvfp4_fake_quantize(x, scale, block_rows=block_rows, stochastic=stochastic, generator=generator)
    if stochastic or block_rows != 1:
        raise ValueError("FP8 fake quantization is per-tensor with RNE only")
    return fp8_dequantize(*fp8_quantize(x, scale), dtype=x.dtype)


def fake_quantize(x: torch.Tensor, fmt: QuantFormat, *, scale: float | None = None, block_rows: int = 1) -> torch.Tensor:
    """Quantize-dequantize `x` in `fmt` ("nvfp4" / "fp8") with a straight-through (identity) gradient.

    scale: NVFP4 weight_scale_2 / input_scale, or the FP8 per-tensor scale; None = from the live amax.
    block_rows=16: NVFP4 16x16 tiles.
    """
    if fmt not in _FORMATS:
        raise ValueError(f"fake_quantize: format must be one of {_FORMATS}, got {fmt!r}")
    return _StraightThrough.apply(x, lambda t: _qdq(t, fmt, scale, block_rows))


def hadamard_matrix(size: int = HADAMARD_SIZE) -> torch.Tensor:
    """Sylvester Hadamard matrix [size, size] of ±1 (size a power of two); H·Hᵀ = size·I."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"Sylvester Hadamard matrices exist for powers of two, got {size}")
    h = torch.ones(1, 1)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_hadamard_matrix(seed: int, size: int = HADAMARD_SIZE) -> torch.Tensor:
    """The RHT matrix S·H/√size (S = diag of seeded random ±1): orthogonal, float32 [size, size]."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (size,), generator=g).to(torch.float32) * 2 - 1
    return signs[:, None] * hadamard_matrix(size) / math.sqrt(size)


def apply_rht(a: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Multiply each consecutive chunk of the last dimension by `matrix` (a block-diagonal rotation).

    Applied to both inputs of a GEMM along its reduction dimension it cancels: R(A)·R(B)ᵀ = A·Bᵀ.
    """
    size = matrix.shape[0]
    if a.shape[-1] % size:
        raise ValueError(f"apply_rht: the last dimension ({a.shape[-1]}) must be a multiple of {size}; zero-pad it")
    return (a.unflatten(-1, (-1, size)) @ matrix.to(a.dtype)).flatten(-2)


def high_precision_layers(num_layers: int, fraction: float = HIGH_PRECISION_FRACTION, *, first: int = 0,
                          last: int | None = None) -> set[int]:  # fmt: skip
    """Indices of the layers an NVFP4 training run keeps in BF16: the last round(fraction·n) (or `last`),
    plus the first `first` (the 12B run also kept the first 2). Ultra: 108 layers -> the last 16."""
    if num_layers < 0 or not 0 <= fraction <= 1:
        raise ValueError(f"need num_layers >= 0 and 0 <= fraction <= 1, got {num_layers}, {fraction}")
    n_last = math.floor(fraction * num_layers + 0.5) if last is None else last
    n_last, first = min(max(n_last, 0), num_layers), min(max(first, 0), num_layers)
    return set(range(first)) | set(range(num_layers - n_last, num_layers))


def _pad_tokens(a: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last (token) dimension to a multiple of 16; zeros add nothing to the Wgrad sums."""
    pad = -a.shape[-1] % NVFP4_BLOCK
    return F.pad(a, (0, pad)) if pad else a


class _NVFP4TrainingLinear(torch.autograd.Function):
    """Linear layer whose Fprop, Dgrad and Wgrad GEMMs all take quantized operands (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, config, generator, rht_matrix):
        x2 = x.reshape(-1, x.shape[-1])
        xq = _qdq(x2, config.input, config.input_scale) if config.input else x2
        wq = _qdq(weight, config.weight, block_rows=16 if config.weight_2d else 1) if config.weight else weight
        ctx.save_for_backward(x2, weight, wq)
        ctx.config, ctx.generator, ctx.rht_matrix, ctx.has_bias = config, generator, rht_matrix, bias is not None
        return F.linear(xq, wq, bias).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, wq = ctx.saved_tensors
        cfg = ctx.config
        dy2 = dy.reshape(-1, dy.shape[-1])

        def grad_q(t: torch.Tensor) -> torch.Tensor:  # gradients: NVFP4, optionally stochastic
            return _qdq(t, "nvfp4", generator=ctx.generator, stochastic=cfg.stochastic_rounding)

        # Dgrad dx = dy · W reduces over `out`: dy and W quantized along `out`.
        if cfg.weight == "nvfp4" and not cfg.weight_2d:
            w_dgrad = _qdq(weight.t(), "nvfp4").t()  # 1x16 blocks along `out`: a different W than Fprop's
        else:
            w_dgrad = wq  # 16x16 tiles (same matrix both ways), per-tensor FP8, or unquantized
        dx = (grad_q(dy2) @ w_dgrad).reshape(*dy.shape[:-1], weight.shape[1])

        # Wgrad dW = dyᵀ · x reduces over tokens: both operands quantized along tokens, after the RHT.
        a, b = _pad_tokens(dy2.t()), _pad_tokens(x2.t())
        if ctx.rht_matrix is not None:
            a, b = apply_rht(a, ctx.rht_matrix), apply_rht(b, ctx.rht_matrix)
        dw = grad_q(a) @ _qdq(b, "nvfp4").t()
        db = dy2.sum(0) if ctx.has_bias else None
        return dx, dw, db, None, None, None


class FakeQuantLinear(nn.Linear):
    """nn.Linear with fake-quantized weight (and optionally input / gradients); same `weight`/`bias` names,
    so checkpoints and optimizers see an ordinary linear layer."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 config: FakeQuantConfig | None = None, *, seed: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:  # fmt: skip
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.config = config if config is not None else FakeQuantConfig()
        self.seed = self.config.seed if seed is None else seed  # stochastic rounding stream of this layer
        self._generator: torch.Generator | None = None
        self._check_shapes()

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: FakeQuantConfig | None = None, *,
                    seed: int | None = None) -> FakeQuantLinear:  # fmt: skip
        """A FakeQuantLinear sharing `linear`'s weight and bias Parameters (optimizer state stays valid)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, config, seed=seed, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def _check_shapes(self) -> None:
        cfg = self.config
        uses_nvfp4 = "nvfp4" in (cfg.weight, cfg.input) or cfg.gradient == "nvfp4"
        if uses_nvfp4 and self.in_features % NVFP4_BLOCK:
            raise ValueError(f"NVFP4 fake quantization needs in_features % 16 == 0, got {self.in_features}")
        needs_out = cfg.weight_2d or cfg.gradient == "nvfp4"  # 16x16 tiles / Dgrad blocks along `out`
        if needs_out and self.out_features % NVFP4_BLOCK:
            raise ValueError(
                f"weight_2d and gradient='nvfp4' need out_features % 16 == 0, got {self.out_features}"
            )

    def generator(self) -> torch.Generator:
        """This layer's seeded stochastic-rounding generator (created on first use, on the weight's device)."""
        if self._generator is None or self._generator.device != self.weight.device:
            self._generator = torch.Generator(device=self.weight.device).manual_seed(self.seed)
        return self._generator

    def __getstate__(self) -> dict:  # generators neither pickle nor deepcopy portably: recreate on use
        state = self.__dict__.copy()
        state["_generator"] = None
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]."""
        cfg = self.config
        if cfg.gradient is None:
            w = self.weight
            if cfg.weight is not None:
                w = fake_quantize(w, cfg.weight, block_rows=16 if cfg.weight_2d else 1)
            if cfg.input is not None:
                x = fake_quantize(x, cfg.input, scale=cfg.input_scale)
            return F.linear(x, w, self.bias)
        rht = random_hadamard_matrix(cfg.seed).to(self.weight.device) if cfg.rht else None
        gen = self.generator() if cfg.stochastic_rounding else None
        return _NVFP4TrainingLinear.apply(x, self.weight, self.bias, cfg, gen, rht)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, config={self.config}"
