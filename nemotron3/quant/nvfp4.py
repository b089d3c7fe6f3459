"""NVFP4: E2M1 elements, one E4M3 scale per 16 elements along the input dimension, one FP32 tensor scale.

The max-scaling quantizer of ModelOpt 0.47 (research/nvfp4.md §1.3, §2.1; `NVFP4QTensor`), bit for bit:

    weight_scale_2 = fp32(amax|W|) / 2688                      2688 = 6 · 448 (E2M1 max · E4M3 max)
    s_b            = fp32(amax_b) / (6 · weight_scale_2)       per 16-block b; 6·s2 first, then one division
    s_b            = 1 where that is 0 (all-zero blocks)
    weight_scale   = e4m3_rne(clamp(s_b, 2^-9, 448))           float8_e4m3fn [..., K/16]
    d_b            = fp32(weight_scale) · weight_scale_2       the product first
    code           = e2m1_rne_sat(x / d_b)                     one fp32 division
    weight         = code[2k] | code[2k+1] << 4                uint8 [..., K/2]

and the dequantization every consumer computes (ModelOpt `NVFP4QTensor.dequantize`):

    x̂ = e2m1(code) · d_b                                       d_b as above; float32, then cast

Inputs are computed in float32 (bf16/fp16 convert exactly, as ModelOpt's `bf16 / fp32` promotes).
K must be a multiple of 16 (vLLM rejects anything else; every Nemotron 3 dimension is one). Our only
deliberate difference from ModelOpt: an all-zero tensor (weight_scale_2 = 0) gets block scales 1.0 and
zero codes, where ModelOpt would compute 0/0 = NaN scales.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from nemotron3.quant.fp4 import decode_packed_fp4, e2m1_decode, e2m1_encode, e2m1_encode_stochastic, pack_fp4
from nemotron3.quant.fp8 import E4M3_MAX, E4M3_MIN_SUBNORMAL, FP8_DTYPE, as_scale, e4m3_encode

NVFP4_BLOCK = 16
NVFP4_SCALE_DENOMINATOR = 6.0 * 448.0  # E2M1 max · E4M3 max = 2688: the tensor amax maps to 6 · 448


class NVFP4Weight(NamedTuple):
    """An NVFP4 tensor as stored in a ModelOpt checkpoint (names = the safetensors suffixes)."""

    weight: torch.Tensor  # uint8 [..., K/2], element 2k in the low nibble
    weight_scale: torch.Tensor  # float8_e4m3fn [..., K/16], row-major, unswizzled
    weight_scale_2: torch.Tensor  # float32, 0-dim


def _check_input(x: torch.Tensor, block_rows: int) -> torch.Tensor:
    """Validate an input to NVFP4 quantization and return it as float32."""
    if not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise TypeError(f"NVFP4 quantization needs a bf16/fp16/fp32 tensor, got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] % NVFP4_BLOCK:
        raise ValueError(
            f"NVFP4 quantizes blocks of {NVFP4_BLOCK} along the last (input) dimension, which must be a multiple "
            f"of {NVFP4_BLOCK}; got shape {tuple(x.shape)}. Zero-pad the input dimension to a multiple of 16 "
            "(and the activations to match), or keep this layer in BF16/FP8"
        )
    if block_rows not in (1, NVFP4_BLOCK):
        raise ValueError(f"block_rows must be 1 (1x16 blocks) or 16 (16x16 tiles), got {block_rows}")
    if block_rows > 1 and (x.ndim < 2 or x.shape[-2] % block_rows):
        raise ValueError(
            f"16x16 tile scaling needs a matrix whose row count is a multiple of 16; got shape {tuple(x.shape)}"
        )
    bad = ~torch.isfinite(x)
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"NVFP4 quantization got {int(bad.sum())} inf/NaN value(s) (first at index {where}: "
            f"{x[where].item()}); the scales come from the amax and cannot represent them. Find where the "
            "tensor went non-finite (a diverged training step, an overflowing bf16 cast) before quantizing"
        )
    return x.to(torch.float32)


def nvfp4_global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """weight_scale_2 = amax / 2688 in float32 (ModelOpt `get_weights_scaling_factor_2`)."""
    a = as_scale(amax, "amax")
    if not torch.isfinite(a) or a < 0:
        raise ValueError(f"amax must be finite and >= 0, got {a.item()}")
    return a / NVFP4_SCALE_DENOMINATOR


def nvfp4_input_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """`input_scale` of an NVFP4 (W4A4) layer from a calibrated activation amax: amax / 2688.

    ModelOpt `get_activation_scaling_factor` = amax / (6 · 448) and asserts it is positive.
    """
    a = as_scale(amax, "activation amax")
    if not torch.isfinite(a) or a <= 0:
        raise ValueError(
            f"activation amax must be finite and > 0, got {a.item()}: an input never seen during calibration has "
            "no scale (ModelOpt gives unrouted experts the max over the other experts' input amax)"
        )
    return a / NVFP4_SCALE_DENOMINATOR


def _resolve_global_scale(x32: torch.Tensor, weight_scale_2: torch.Tensor | float | None) -> torch.Tensor:
    if weight_scale_2 is None:
        return nvfp4_global_scale(x32.abs().amax() if x32.numel() else 0.0).to(x32.device)
    s2 = as_scale(weight_scale_2, "weight_scale_2").to(x32.device)
    if not torch.isfinite(s2) or s2 < 0 or (s2 == 0 and bool(x32.any())):
        raise ValueError(f"weight_scale_2 must be finite and > 0 for a non-zero tensor, got {s2.item()}")
    return s2


def _block_amax(x32: torch.Tensor, block_rows: int) -> torch.Tensor:
    """amax per 1x16 block [..., K/16], or per 16x16 tile replicated over its 16 rows (same shape)."""
    blocks = x32.abs().unflatten(-1, (-1, NVFP4_BLOCK))  # [..., R, K/16, 16]
    if block_rows == 1:
        return blocks.amax(-1)
    tiles = blocks.unflatten(-3, (-1, block_rows)).amax(dim=(-3, -1))  # [..., R/16, K/16]
    return tiles.repeat_interleave(block_rows, dim=-2)


def _block_scales(x32: torch.Tensor, s2: torch.Tensor, block_rows: int) -> torch.Tensor:
    amax_b = _block_amax(x32, block_rows)
    s_b = amax_b / (6.0 * s2)
    s_b = torch.where((s_b == 0) | (amax_b == 0), torch.ones_like(s_b), s_b)  # ModelOpt: s_b == 0 -> 1.0
    return e4m3_encode(s_b.clamp(E4M3_MIN_SUBNORMAL, E4M3_MAX))


def nvfp4_block_scales(x: torch.Tensor, weight_scale_2: torch.Tensor | float | None = None, *,
                       block_rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(weight_scale float8_e4m3fn [..., K/16], weight_scale_2 float32 0-dim) of `x` by max scaling.

    block_rows=16 takes each amax over a 16x16 tile (the training recipe's 2-D weight scaling, research/
    nvfp4.md §7 item 2) and repeats it over the tile's rows, so the result has the same 1x16 layout.
    """
    x32 = _check_input(x, block_rows)
    s2 = _resolve_global_scale(x32, weight_scale_2)
    return _block_scales(x32, s2, block_rows), s2


def _encode(x32: torch.Tensor, weight_scale: torch.Tensor, s2: torch.Tensor,
            generator: torch.Generator | None, stochastic: bool) -> torch.Tensor:  # fmt: skip
    d = (weight_scale.to(torch.float32) * s2).unsqueeze(-1)  # [..., K/16, 1]
    scaled = x32.unflatten(-1, (-1, NVFP4_BLOCK)) / d
    if s2 == 0:  # all-zero tensor: 0/0
        scaled = torch.zeros_like(scaled)
    codes = e2m1_encode_stochastic(scaled, generator) if stochastic else e2m1_encode(scaled)
    return codes.flatten(-2)


def nvfp4_encode(x: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor | float, *,
                 stochastic: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """Unpacked E2M1 codes (uint8 [..., K]) of `x` under given scales; RNE, or stochastic rounding."""
    x32 = _check_input(x, 1)
    if weight_scale.dtype != FP8_DTYPE or weight_scale.shape != (*x.shape[:-1], x.shape[-1] // NVFP4_BLOCK):
        raise ValueError(
            f"weight_scale must be float8_e4m3fn of shape {(*x.shape[:-1], x.shape[-1] // NVFP4_BLOCK)}, "
            f"got {weight_scale.dtype} {tuple(weight_scale.shape)}"
        )
    s2 = _resolve_global_scale(x32, weight_scale_2)
    return _encode(x32, weight_scale, s2, generator, stochastic)


def nvfp4_quantize(x: torch.Tensor, weight_scale_2: torch.Tensor | float | None = None, *,
                   block_rows: int = 1) -> NVFP4Weight:  # fmt: skip
    """Quantize `x` [..., K] (K % 16 == 0) to NVFP4 by ModelOpt's max scaling.

    weight_scale_2: the per-tensor scale; default amax(|x|)/2688. Pass one to share it between tensors
    that a runtime fuses (vLLM takes one global scale for fused shards) or to use a calibrated value.
    block_rows: 1 for the checkpoint format's 1x16 blocks, 16 for 16x16 tiles (training; same layout).
    """
    x32 = _check_input(x, block_rows)
    s2 = _resolve_global_scale(x32, weight_scale_2)
    weight_scale = _block_scales(x32, s2, block_rows)
    codes = _encode(x32, weight_scale, s2, None, stochastic=False)
    return NVFP4Weight(pack_fp4(codes), weight_scale, s2)


def _check_packed(weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor | float) -> None:
    if weight.dtype != torch.uint8:
        raise TypeError(f"NVFP4 weight must be uint8 (two E2M1 codes per byte), got {weight.dtype}")
    if weight_scale.dtype != FP8_DTYPE:
        raise TypeError(
            f"NVFP4 weight_scale must be float8_e4m3fn, got {weight_scale.dtype} (raw bytes: .view(torch.float8_e4m3fn))"
        )
    expected = (*weight.shape[:-1], weight.shape[-1] * 2 // NVFP4_BLOCK) if weight.ndim else None
    if weight.ndim == 0 or weight.shape[-1] % (NVFP4_BLOCK // 2) or tuple(weight_scale.shape) != expected:
        raise ValueError(
            f"NVFP4 shapes do not match: weight {tuple(weight.shape)} (uint8 [..., K/2]) needs weight_scale "
            f"[..., K/16] = {expected}, got {tuple(weight_scale.shape)}"
        )
    as_scale(weight_scale_2, "weight_scale_2")


def nvfp4_dequantize(weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor | float,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """x̂ [..., K] = e2m1(code) · (fp32(weight_scale) · weight_scale_2), in float32, then cast to `dtype`."""
    _check_packed(weight, weight_scale, weight_scale_2)
    return dequantize_unchecked(weight, weight_scale, as_scale(weight_scale_2, "weight_scale_2"), dtype)


def dequantize_unchecked(weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor,
                         dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """nvfp4_dequantize without validation, for hot loops over tensors validated once (linear.py)."""
    d = (weight_scale.to(torch.float32) * weight_scale_2).unsqueeze(-1)  # [..., K/16, 1]
    values = decode_packed_fp4(weight).unflatten(-1, (-1, NVFP4_BLOCK))
    out = values.mul_(d).flatten(-2)
    return out if dtype == torch.float32 else out.to(dtype)


def nvfp4_fake_quantize(x: torch.Tensor, weight_scale_2: torch.Tensor | float | None = None, *, block_rows: int = 1,
                        stochastic: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """Quantize then dequantize (no packing), returned in x's dtype: NVFP4 numerics for training.

    Block scales are always RNE; `stochastic=True` rounds the elements stochastically (gradients).
    Equals nvfp4_dequantize(*nvfp4_quantize(x)) bit for bit when stochastic is False.
    """
    x32 = _check_input(x, block_rows)
    s2 = _resolve_global_scale(x32, weight_scale_2)
    weight_scale = _block_scales(x32, s2, block_rows)
    codes = _encode(x32, weight_scale, s2, generator, stochastic)
    d = (weight_scale.to(torch.float32) * s2).unsqueeze(-1)
    out = (e2m1_decode(codes).unflatten(-1, (-1, NVFP4_BLOCK)) * d).flatten(-2)
    return out.to(x.dtype)
