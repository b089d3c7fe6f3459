"""FP8 E4M3 ("e4m3fn", torch.float8_e4m3fn) and per-tensor FP8 weights/activations as ModelOpt exports them.

E4M3fn (research/nvfp4.md §1.2): 1 sign, 4 exponent bits (bias 7), 3 mantissa bits; max finite 448
(0x7E), 0x7F / 0xFF are NaN, no Inf; min normal 2^-6, min subnormal 2^-9. Encoding is round to nearest,
ties to even, saturating at ±448 (the notes: never rely on a cast's overflow behaviour, so we clamp first;
within range torch's float32 -> float8_e4m3fn cast is exactly RNE, which tests/quant/test_fp8.py checks
against an independent table-based reference for every code and every midpoint).

Per-tensor FP8 (research/nvfp4.md §1.6, ModelOpt `export/quant_utils.py: to_quantized_weight`):
    weight_scale = amax(|W|) / 448                    (fp32, 0-dim)
    weight_fp8   = e4m3(W / weight_scale)             (the division in W's dtype: see fp8_quantize)
    input_scale  = calibrated activation amax / 448   (fp32, 0-dim; the KV cache k_scale/v_scale alike)
    W ≈ float(weight_fp8) · weight_scale
"""

from __future__ import annotations

from typing import NamedTuple

import torch

E4M3_MAX = 448.0  # 0x7E = 2^8 · 1.75
E4M3_MIN_NORMAL = 2.0**-6
E4M3_MIN_SUBNORMAL = 2.0**-9  # 0x01 = 2^-6 · 1/8
FP8_DTYPE = torch.float8_e4m3fn

# float32 value of every byte (0x7F, 0xFF -> NaN). A 256-entry table lookup decodes ~1.4x faster on CPU
# than torch's float8 -> float32 cast, with identical values.
_DECODE_TABLE = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).to(torch.float32)


def as_scale(value: torch.Tensor | float, what: str) -> torch.Tensor:
    """A 0-dim float32 tensor from a float or a one-element tensor (how every per-tensor scale is stored)."""
    t = torch.as_tensor(value)
    if t.numel() != 1:
        raise ValueError(f"{what} must be a single number (a per-tensor scale), got shape {tuple(t.shape)}")
    return t.detach().to(torch.float32).reshape(())


def e4m3_encode(x: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn of `x`, round to nearest even, saturating at ±448 (±inf saturates too).

    Computed from float32 (bf16/fp16 convert exactly; float64 is rounded to float32 first, as torch's
    cast does). NaN raises ValueError: the scales built from it would be meaningless.
    """
    if not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise TypeError(f"e4m3_encode needs a bf16/fp16/fp32/fp64 tensor, got {x.dtype}")
    if torch.isnan(x).any():
        raise ValueError("e4m3_encode: the input contains NaN, which has no meaning as an FP8 value or scale")
    return x.to(torch.float32).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def e4m3_decode(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of float8_e4m3fn data (exact in float32, bf16 and fp16 alike)."""
    if x.dtype != FP8_DTYPE:
        raise TypeError(f"e4m3_decode needs float8_e4m3fn data, got {x.dtype}")
    index = x.view(torch.uint8).reshape(-1).to(torch.int32)
    values = torch.index_select(_DECODE_TABLE.to(x.device), 0, index).view(x.shape)
    return values if dtype == torch.float32 else values.to(dtype)


def e4m3_to_bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bytes (uint8) of float8_e4m3fn data."""
    if x.dtype != FP8_DTYPE:
        raise TypeError(f"e4m3_to_bits needs float8_e4m3fn data, got {x.dtype}")
    return x.view(torch.uint8)


def e4m3_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn data from raw bytes (uint8), e.g. as read from a file."""
    if bits.dtype != torch.uint8:
        raise TypeError(f"e4m3_from_bits needs uint8 bytes, got {bits.dtype}")
    return bits.view(FP8_DTYPE)


def fp8_scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """Per-tensor FP8 scale amax / 448 in float32 (ModelOpt: `amax.float() / maxbound`)."""
    a = as_scale(amax, "amax")
    if not torch.isfinite(a) or a < 0:
        raise ValueError(f"amax must be finite and >= 0, got {a.item()}")
    return a / E4M3_MAX


def fp8_input_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """`input_scale` (or KV `k_scale`/`v_scale`) of an FP8 layer from a calibrated activation amax: amax / 448."""
    a = as_scale(amax, "activation amax")
    if not torch.isfinite(a) or a <= 0:
        raise ValueError(
            f"activation amax must be finite and > 0, got {a.item()}: an input never seen during calibration has "
            "no scale (ModelOpt gives unrouted experts the max over the other experts' input amax)"
        )
    return a / E4M3_MAX


class FP8Weight(NamedTuple):
    """A per-tensor FP8 weight as stored in a ModelOpt checkpoint."""

    weight: torch.Tensor  # float8_e4m3fn, the original shape
    weight_scale: torch.Tensor  # float32, 0-dim


def fp8_quantize(w: torch.Tensor, weight_scale: torch.Tensor | float | None = None) -> FP8Weight:
    """Per-tensor FP8 quantization: weight_scale = amax/448 unless given, weight = e4m3(w / weight_scale).

    Bit-compatible with ModelOpt's export, including its dtype: `w / weight_scale` with a 0-dim float32
    scale is computed in w's dtype (for bf16 weights: bf16(float32(w) / scale)), then cast to FP8.
    An all-zero tensor gets weight_scale 0 and zero codes (ModelOpt would divide 0/0 there).
    """
    if not w.is_floating_point() or w.dtype == FP8_DTYPE:
        raise TypeError(f"fp8_quantize needs a bf16/fp16/fp32 tensor, got {w.dtype}")
    if not torch.isfinite(w).all():
        raise ValueError("fp8_quantize: the weight contains inf/NaN; a per-tensor scale cannot be computed from it")
    if weight_scale is None:
        scale = fp8_scale_from_amax(w.abs().amax() if w.numel() else 0.0)
    else:
        scale = as_scale(weight_scale, "weight_scale")
        if not torch.isfinite(scale) or scale < 0:
            raise ValueError(f"weight_scale must be finite and >= 0, got {scale.item()}")
    if scale == 0:
        if w.any():
            raise ValueError("weight_scale is 0 but the weight is not all zero")
        return FP8Weight(torch.zeros(w.shape, dtype=FP8_DTYPE, device=w.device), scale.to(w.device))
    scale = scale.to(w.device)
    return FP8Weight(e4m3_encode(w / scale), scale)


def fp8_dequantize(weight: torch.Tensor, weight_scale: torch.Tensor | float,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """float(weight) · weight_scale, computed in float32 (one rounding), then cast to `dtype`."""
    scale = as_scale(weight_scale, "weight_scale").to(weight.device)
    out = e4m3_decode(weight).mul_(scale)
    return out if dtype == torch.float32 else out.to(dtype)
