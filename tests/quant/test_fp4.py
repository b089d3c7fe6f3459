"""FP4 E2M1 codec against the independent reference (tests/quant/reference.py) and research/nvfp4.md §1.1."""

import numpy as np
import pytest
import torch

from nemotron3.quant.fp4 import (
    E2M1_VALUES,
    decode_packed_fp4,
    e2m1_decode,
    e2m1_encode,
    e2m1_encode_stochastic,
    pack_fp4,
    unpack_fp4,
)
from tests.quant import reference as ref

ALL_CODES = torch.arange(16, dtype=torch.uint8)


def test_the_16_codes_decode_to_the_bit_field_values():
    expected = [ref.e2m1_code_value(c) for c in range(16)]
    assert e2m1_decode(ALL_CODES).tolist() == expected
    assert list(E2M1_VALUES) == expected
    assert expected[:8] == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert not torch.signbit(e2m1_decode(ALL_CODES)[8])  # 0x8 = -0 decodes to +0, as ModelOpt's table


def test_every_code_round_trips():
    values = e2m1_decode(ALL_CODES)
    again = e2m1_encode(values)
    # -0 (0x8) decodes to zero, which encodes as +0 (ModelOpt sets the sign bit only for x < 0)
    assert again.tolist() == [c if c != 8 else 0 for c in range(16)]
    assert torch.equal(e2m1_decode(again), values)


def test_ties_round_to_the_even_code_and_saturate():
    # research/nvfp4.md §1.1 tie table, verified against ModelOpt's _cast_fp4
    ties = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0, 5.01: 6.0, 6.5: 6.0, 1e30: 6.0}
    x = torch.tensor(list(ties), dtype=torch.float32)
    assert e2m1_decode(e2m1_encode(x)).tolist() == list(ties.values())
    assert e2m1_decode(e2m1_encode(-x)).tolist() == [-v for v in ties.values()]
    assert e2m1_encode(torch.tensor([float("inf"), float("-inf")])).tolist() == [7, 15]
    assert e2m1_encode(torch.tensor([-0.25, -0.1, -0.0])).tolist() == [8, 8, 0]  # -0.25 -> 0x8 (-0), as ModelOpt


def _hard_values(rng: np.random.Generator) -> np.ndarray:
    grid = np.array(ref.E2M1_GRID, dtype=np.float32)
    mids = (grid[1:] + grid[:-1]) / 2
    exact = np.concatenate([grid, mids, [6.0, 7.0, 12.0, 3e38]]).astype(np.float32)
    nudged = np.concatenate([np.nextafter(exact, np.float32(np.inf)), np.nextafter(exact, np.float32(0))])
    subnormal = np.array([1e-45, 1e-40, 1.2e-38], dtype=np.float32)
    random = np.concatenate([rng.normal(0, 2, 20000), rng.uniform(-8, 8, 20000), rng.standard_t(3, 5000)])
    out = np.concatenate([exact, nudged, subnormal, random.astype(np.float32)]).astype(np.float32)
    return np.concatenate([out, -out])


def test_encode_matches_the_reference_on_hard_and_random_values():
    x = _hard_values(np.random.default_rng(0))
    ours = e2m1_encode(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(ours, ref.e2m1_encode(x))


def test_bf16_and_fp64_inputs_encode_like_their_values():
    x = torch.from_numpy(_hard_values(np.random.default_rng(1))[:4000])
    for dtype in (torch.bfloat16, torch.float64):
        xd = x.to(dtype)
        np.testing.assert_array_equal(e2m1_encode(xd).numpy(), ref.e2m1_encode(xd.double().numpy()))


def test_nan_is_rejected_clearly():
    with pytest.raises(ValueError, match="NaN"):
        e2m1_encode(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="floating"):
        e2m1_encode(torch.tensor([1, 2]))


def test_packing_puts_the_even_element_in_the_low_nibble():
    # research/nvfp4.md §2.1 golden vector: [6.0, -0.5, 1.0, 0...] -> bytes 97 02 00 ...
    x = torch.zeros(16)
    x[:3] = torch.tensor([6.0, -0.5, 1.0])
    assert pack_fp4(e2m1_encode(x)).tolist() == [0x97, 0x02, 0, 0, 0, 0, 0, 0]
    codes = torch.randint(0, 16, (3, 5, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_fp4(codes)
    assert packed.shape == (3, 5, 16) and packed.dtype == torch.uint8
    assert torch.equal(packed & 0xF, codes[..., 0::2]) and torch.equal(packed >> 4, codes[..., 1::2])
    assert torch.equal(unpack_fp4(packed), codes)
    assert torch.equal(decode_packed_fp4(packed), e2m1_decode(codes))
    assert torch.equal(decode_packed_fp4(packed, torch.bfloat16), e2m1_decode(codes).bfloat16())


def test_packing_errors_name_the_problem():
    with pytest.raises(ValueError, match="even"):
        pack_fp4(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        pack_fp4(torch.tensor([16, 0], dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        unpack_fp4(torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="packed"):
        e2m1_decode(torch.tensor([0x97], dtype=torch.uint8))


def test_stochastic_rounding_is_unbiased_bounded_and_seeded():
    # research/nvfp4.md §8 item 6: mean over 1e5 draws within 1e-2 of the input, never outside the neighbours
    values = torch.tensor([2.6, -0.3, 4.9, 0.1, 1.2])
    x = values.repeat(100_000, 1)
    codes = e2m1_encode_stochastic(x, torch.Generator().manual_seed(0))
    decoded = e2m1_decode(codes)
    assert torch.allclose(decoded.mean(0), values, atol=1e-2)
    lo = torch.tensor([2.0, -0.5, 4.0, 0.0, 1.0])
    hi = torch.tensor([3.0, 0.0, 6.0, 0.5, 1.5])
    assert ((decoded == lo) | (decoded == hi)).all()
    again = e2m1_encode_stochastic(x, torch.Generator().manual_seed(0))
    other = e2m1_encode_stochastic(x, torch.Generator().manual_seed(1))
    assert torch.equal(codes, again) and not torch.equal(codes, other)
    grid = e2m1_decode(ALL_CODES)  # values on the grid never move; beyond 6 saturates
    assert torch.equal(e2m1_decode(e2m1_encode_stochastic(grid)), grid)
    assert e2m1_decode(e2m1_encode_stochastic(torch.tensor([7.0, -1e9]))).tolist() == [6.0, -6.0]
