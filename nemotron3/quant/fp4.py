"""FP4 E2M1, the NVFP4 / MXFP4 element format: 16 codes, encode, decode, two codes per byte.

A code is a nibble: bit 3 = sign, bits 2-1 = exponent (bias 1), bit 0 = mantissa
(research/nvfp4.md §1.1). Magnitudes of codes 0..7: 0, 0.5 (the one subnormal), 1, 1.5, 2, 3, 4, 6;
codes 8..15 are their negatives (8 = -0, which decodes to 0). There is no Inf or NaN.

Encoding rounds to nearest with ties to the even code and saturates beyond 6 (PTX `cvt.rn.satfinite`).
The decision thresholds on |x| are the midpoints 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5; a tie at 0.75, 1.75
or 3.5 goes up (1.0, 2.0 and 4.0 have the even codes 2, 4, 6), a tie at 0.25, 1.25, 2.5, 5 goes down.
The sign bit is set for every x < 0, so -0.25 encodes as 0x8 (-0), as ModelOpt writes it.

Packing (ModelOpt `NVFP4QTensor.quantize`, vLLM, NeMo Automodel): element 2k in the low nibble, 2k+1 in
the high nibble: `byte[k] = code[2k] | code[2k+1] << 4`.
"""

from __future__ import annotations

import torch

E2M1_MAX = 6.0
# Decoded value of each code. 0x8 is -0 and decodes to +0, as the ModelOpt and vLLM tables do, so that a
# dequantized tensor has no negative zeros.
E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                                  0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # fmt: skip
_MAGNITUDES = E2M1_VALUES[:8]
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between consecutive magnitudes
_TIES_UP = (0.75, 1.75, 3.5)  # midpoints whose upper neighbour has the even code

# Decode tables. _PAIR_VALUES[b] = (value of the low nibble of byte b, value of its high nibble); the same
# 256 x 2 float32 table viewed as 256 int64 lets one index_select fetch both values of a byte (a 2-wide
# advanced-indexing gather is ~5x slower on CPU).
_VALUES = torch.tensor(E2M1_VALUES, dtype=torch.float32)
_PAIR_VALUES = torch.stack([_VALUES.repeat(16), _VALUES.repeat_interleave(16)], dim=-1).contiguous()  # [256, 2]
_PAIR_BITS = _PAIR_VALUES.view(torch.int64).reshape(256)


def _check_float(x: torch.Tensor, what: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{what} needs a floating-point tensor, got {x.dtype}")
    if torch.isnan(x).any():
        raise ValueError(f"{what}: the input contains NaN, which FP4 E2M1 cannot represent")


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, 0..15, same shape) of `x`: round to nearest, ties to even code, saturate at ±6.

    ±inf saturates to ±6 like the hardware's satfinite conversion; NaN raises ValueError.
    """
    _check_float(x, "e2m1_encode")
    mag = x.abs()
    bounds = torch.tensor(_MIDPOINTS, dtype=mag.dtype, device=mag.device)
    code = torch.bucketize(mag, bounds)  # number of midpoints strictly below |x|: a tie rounds down
    tie_up = (mag == _TIES_UP[0]) | (mag == _TIES_UP[1]) | (mag == _TIES_UP[2])
    code = code.to(torch.uint8) + tie_up.to(torch.uint8)
    return code | ((x < 0).to(torch.uint8) << 3)


def e2m1_encode_stochastic(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """E2M1 codes by stochastic rounding (training gradients, research/nvfp4.md §1.1, §7 item 4).

    |x| is clamped to 6; between grid neighbours lo <= |x| < hi the result is hi with probability
    (|x| - lo) / (hi - lo), else lo, so E[decode(code)] = x. `generator` makes it reproducible.
    """
    _check_float(x, "e2m1_encode_stochastic")
    mag = x.abs().clamp(max=E2M1_MAX)
    grid = torch.tensor(_MAGNITUDES, dtype=mag.dtype, device=mag.device)
    lo_code = torch.bucketize(mag, grid, right=True) - 1  # largest grid index with grid <= |x|
    hi_code = (lo_code + 1).clamp(max=7)
    lo, hi = grid[lo_code], grid[hi_code]
    p_up = torch.where(hi > lo, (mag - lo) / (hi - lo), torch.zeros_like(mag))
    u = torch.rand(mag.shape, generator=generator, dtype=mag.dtype, device=mag.device)
    code = (lo_code + (u < p_up).to(lo_code.dtype)).to(torch.uint8)
    return code | ((x < 0).to(torch.uint8) << 3)


def _check_codes(codes: torch.Tensor, what: str) -> None:
    if codes.dtype != torch.uint8:
        raise TypeError(f"{what} needs uint8 E2M1 codes, got {codes.dtype}")


def e2m1_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of E2M1 codes (uint8, one code per element; high bits must be 0)."""
    _check_codes(codes, "e2m1_decode")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"e2m1_decode: codes must be 0..15, found {int(codes.max())} (packed bytes? use unpack_fp4)")
    return _VALUES.to(codes.device)[codes.long()].to(dtype)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte along the last dimension: [..., 2n] codes -> [..., n] bytes, even index low nibble."""
    _check_codes(codes, "pack_fp4")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4: the last dimension must be even (two codes per byte), got {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"pack_fp4: codes must be 0..15, found {int(codes.max())}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_fp4: [..., n] bytes -> [..., 2n] codes (low nibble first)."""
    _check_codes(packed, "unpack_fp4")
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def decode_packed_fp4(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of packed E2M1 bytes, [..., n] -> [..., 2n], in one table lookup per byte."""
    _check_codes(packed, "decode_packed_fp4")
    table = _PAIR_BITS.to(packed.device)
    pairs = torch.index_select(table, 0, packed.reshape(-1).to(torch.int32))
    values = pairs.view(torch.float32).view(*packed.shape[:-1], 2 * packed.shape[-1])
    return values if dtype == torch.float32 else values.to(dtype)  # E2M1 values are exact in every float dtype
