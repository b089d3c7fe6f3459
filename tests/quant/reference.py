"""Independent reference of E2M1, E4M3 and NVFP4, written from the specification in plain Python/numpy.

Nothing here imports nemotron3 or uses torch's float8 casts. Values come from the bit fields
(research/nvfp4.md §1.1, §1.2); encoding searches the whole value grid for the nearest value and breaks
exact ties toward the even code, which is the definition of round-to-nearest-even (the package instead
compares against midpoints and casts). NVFP4 follows the algorithm of research/nvfp4.md §2.1 in float32
numpy arithmetic, one operation at a time.

Distances are computed in float64: for float32 inputs the difference to either neighbouring grid value is
exact (both lie within a few binades of each other, so the difference needs < 53 bits), so ties are
detected exactly; far-away grid values can round but are never the nearest.
"""

from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------- E2M1 (1 sign, 2 exponent bias 1, 1 mantissa)


def e2m1_code_value(code: int) -> float:
    """Value of a 4-bit E2M1 code from its bit fields."""
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 0b1
    if exponent == 0:  # subnormal: 0.m · 2^(1 - bias) = m/2
        return sign * mantissa * 0.5
    return sign * (1.0 + mantissa / 2.0) * 2.0 ** (exponent - 1)


E2M1_GRID = np.array([e2m1_code_value(c) for c in range(8)], dtype=np.float64)  # codes 0..7, ascending


def e2m1_encode(x: np.ndarray) -> np.ndarray:
    """E2M1 codes (uint8) of finite or infinite values: nearest grid value, ties to even code, saturate at 6,
    sign bit for every x < 0."""
    x = np.asarray(x, dtype=np.float64)
    mag = np.minimum(np.abs(x), 6.0).reshape(-1)
    dist = np.abs(mag[:, None] - E2M1_GRID[None, :])
    nearest = dist == dist.min(axis=1, keepdims=True)
    even = nearest & (np.arange(8)[None, :] % 2 == 0)
    code = np.where(even.any(axis=1), even.argmax(axis=1), nearest.argmax(axis=1))
    code = code.reshape(x.shape).astype(np.uint8)
    return code | (np.signbit(x) & (x != 0)).astype(np.uint8) << 3


def e2m1_decode(codes: np.ndarray) -> np.ndarray:
    table = np.array([e2m1_code_value(c) for c in range(16)], dtype=np.float32)
    return table[np.asarray(codes, dtype=np.int64)]


# ---------------------------------------------------------------- E4M3fn (1 sign, 4 exponent bias 7, 3 mantissa)


def e4m3_code_value(code: int) -> float:
    """Value of an 8-bit E4M3fn code from its bit fields (0x7F and 0xFF are NaN; there is no infinity)."""
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return float("nan")
    if exponent == 0:  # subnormal: 0.mmm · 2^(1 - 7)
        return sign * (mantissa / 8.0) * 2.0**-6
    return sign * (1.0 + mantissa / 8.0) * 2.0 ** (exponent - 7)


E4M3_GRID = np.array([e4m3_code_value(c) for c in range(0x7F)], dtype=np.float64)  # codes 0x00..0x7E
E4M3_MAX = float(E4M3_GRID[-1])  # 448


def e4m3_encode(x: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """E4M3fn codes (uint8) of non-NaN values: nearest value, ties to even code, saturating at ±448."""
    x = np.asarray(x, dtype=np.float64)
    flat = np.minimum(np.abs(x).reshape(-1), E4M3_MAX)
    codes = np.empty(flat.shape, dtype=np.uint8)
    evens = np.arange(len(E4M3_GRID))[None, :] % 2 == 0
    for start in range(0, flat.size, chunk):
        mag = flat[start : start + chunk]
        dist = np.abs(mag[:, None] - E4M3_GRID[None, :])
        nearest = dist == dist.min(axis=1, keepdims=True)
        even = nearest & evens
        codes[start : start + chunk] = np.where(even.any(axis=1), even.argmax(axis=1), nearest.argmax(axis=1))
    codes = codes.reshape(x.shape)
    return codes | np.signbit(x).astype(np.uint8) << 7


def e4m3_decode(codes: np.ndarray) -> np.ndarray:
    table = np.array([e4m3_code_value(c) for c in range(256)], dtype=np.float32)
    return table[np.asarray(codes, dtype=np.int64)]


# ---------------------------------------------------------------- bfloat16 rounding (IEEE RNE on the top 16 bits)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round finite float32 values to the nearest bfloat16 (ties to even), returned as float32."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


# ---------------------------------------------------------------- FP8 per tensor (research/nvfp4.md §1.6)


def fp8_quantize(w: np.ndarray, bf16_input: bool = False) -> tuple[np.ndarray, np.float32]:
    """(codes uint8, scale float32): scale = amax/448; codes = e4m3(w / scale), the division rounded to
    bfloat16 first when the weight is bfloat16 (ModelOpt divides in the weight's dtype)."""
    w = np.asarray(w, dtype=np.float32)
    scale = np.float32(np.float32(np.abs(w).max()) / np.float32(448.0))
    q = (w / scale).astype(np.float32)
    if bf16_input:
        q = bf16_round(q)
    return e4m3_encode(q), scale


# ---------------------------------------------------------------- NVFP4 (research/nvfp4.md §2.1)


def nvfp4_quantize(x: np.ndarray, weight_scale_2: float | None = None,
                   block_rows: int = 1) -> tuple[np.ndarray, np.ndarray, np.float32]:  # fmt: skip
    """(packed uint8 [R, K/2], block-scale codes uint8 [R, K/16], weight_scale_2 float32) of a float32 matrix.

    block_rows=16 takes each block amax over a 16x16 tile. An all-zero tensor gets scale 1 and codes 0.
    """
    x = np.asarray(x, dtype=np.float32)
    rows, k = x.shape
    f32 = np.float32
    s2 = f32(np.abs(x).max()) / f32(2688.0) if weight_scale_2 is None else f32(weight_scale_2)
    s2 = f32(s2)
    blocks = x.reshape(rows, k // 16, 16)
    amax_b = np.abs(blocks).max(axis=2).astype(np.float32)
    if block_rows > 1:
        tiles = amax_b.reshape(rows // block_rows, block_rows, k // 16).max(axis=1)
        amax_b = np.repeat(tiles, block_rows, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sb = (amax_b / (f32(6.0) * s2)).astype(np.float32)
    sb = np.where((sb == 0) | (amax_b == 0), f32(1.0), sb)
    sb = np.clip(sb, f32(2.0**-9), f32(448.0))
    scale_codes = e4m3_encode(sb)
    d = (e4m3_decode(scale_codes) * s2).astype(np.float32)
    if s2 == 0:
        scaled = np.zeros_like(blocks)
    else:
        scaled = (blocks / d[:, :, None]).astype(np.float32)
    codes = e2m1_encode(scaled).reshape(rows, k)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return packed, scale_codes, s2


def nvfp4_dequantize(packed: np.ndarray, scale_codes: np.ndarray, s2: np.float32) -> np.ndarray:
    """x̂ = e2m1(code) · (float(scale) · s2), float32."""
    rows, half = packed.shape
    codes = np.empty((rows, half * 2), dtype=np.uint8)
    codes[:, 0::2], codes[:, 1::2] = packed & 0xF, packed >> 4
    d = (e4m3_decode(scale_codes) * np.float32(s2)).astype(np.float32)
    values = e2m1_decode(codes).reshape(rows, -1, 16)
    return (values * d[:, :, None]).astype(np.float32).reshape(rows, -1)
