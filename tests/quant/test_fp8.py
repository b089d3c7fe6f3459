"""FP8 E4M3fn codec and per-tensor FP8 quantization against the independent reference (research/nvfp4.md §1.2, §1.6)."""

import numpy as np
import pytest
import torch

from nemotron3.quant.fp8 import (
    E4M3_MAX,
    E4M3_MIN_SUBNORMAL,
    e4m3_decode,
    e4m3_encode,
    e4m3_from_bits,
    e4m3_to_bits,
    fp8_dequantize,
    fp8_input_scale,
    fp8_quantize,
    fp8_scale_from_amax,
)
from tests.quant import reference as ref

ALL_BYTES = torch.arange(256, dtype=torch.uint8)


def test_every_byte_decodes_to_its_bit_field_value():
    ours = e4m3_decode(e4m3_from_bits(ALL_BYTES)).numpy()
    np.testing.assert_array_equal(ours, ref.e4m3_decode(np.arange(256)))  # NaN at 0x7F/0xFF on both sides
    assert ref.E4M3_MAX == E4M3_MAX == 448.0 and ref.e4m3_code_value(1) == E4M3_MIN_SUBNORMAL == 2.0**-9
    finite = ~np.isnan(ours)
    assert finite.sum() == 254 and (ours[finite] > 0).sum() == 126  # 126 positive finite values
    in_bf16 = e4m3_decode(e4m3_from_bits(ALL_BYTES), torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(in_bf16, ours)  # exact in bf16 too


def test_every_code_round_trips():
    codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8)
    values = e4m3_decode(e4m3_from_bits(codes))
    assert torch.equal(e4m3_to_bits(e4m3_encode(values)), codes)  # including 0x80 (-0)


def _hard_values(rng: np.random.Generator) -> np.ndarray:
    grid = ref.E4M3_GRID.astype(np.float32)
    mids = ((ref.E4M3_GRID[1:] + ref.E4M3_GRID[:-1]) / 2).astype(np.float32)  # exact in float32
    exact = np.concatenate([grid, mids, [449.0, 464.0, 480.0, 1e4, 3e38, 2.0**-10, 2.0**-11, 1e-45]]).astype(np.float32)
    nudged = np.concatenate([np.nextafter(exact, np.float32(np.inf)), np.nextafter(exact, np.float32(0))])
    random = np.exp(rng.uniform(np.log(2.0**-12), np.log(500.0), 30000)).astype(np.float32)
    out = np.concatenate([exact, nudged, random, rng.normal(0, 50, 5000).astype(np.float32)])
    return np.concatenate([out, -out])


def test_encode_matches_the_reference_rne_with_saturation():
    x = _hard_values(np.random.default_rng(0))
    ours = e4m3_to_bits(e4m3_encode(torch.from_numpy(x))).numpy()
    np.testing.assert_array_equal(ours, ref.e4m3_encode(x))
    spot = torch.tensor([449.0, 464.0, 1e6, float("inf"), 2.0**-10, 2.0**-10 * 1.0001, 2.0**-10 * 3])
    assert e4m3_decode(e4m3_encode(spot)).tolist() == [448.0, 448.0, 448.0, 448.0, 0.0, 2.0**-9, 2.0**-8]


def test_nan_and_wrong_dtypes_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        e4m3_encode(torch.tensor([float("nan")]))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        e4m3_decode(torch.zeros(2))
    with pytest.raises(ValueError, match="inf/NaN"):
        fp8_quantize(torch.tensor([1.0, float("inf")]))


@pytest.mark.parametrize("dist", ["normal", "student_t", "outlier"])
def test_per_tensor_weight_quantization_matches_the_reference(dist):
    rng = np.random.default_rng(3)
    w = {"normal": rng.normal(0, 0.02, (64, 96)), "student_t": rng.standard_t(3, (64, 96)),
         "outlier": np.where(rng.random((64, 96)) < 0.001, 300.0, rng.normal(0, 1, (64, 96)))}[dist].astype(np.float32)  # fmt: skip
    q = fp8_quantize(torch.from_numpy(w))
    codes, scale = ref.fp8_quantize(w)
    assert q.weight_scale.dtype == torch.float32 and q.weight_scale.shape == ()
    assert q.weight_scale.item() == scale  # amax / 448 in float32
    np.testing.assert_array_equal(e4m3_to_bits(q.weight).numpy(), codes)
    np.testing.assert_array_equal(fp8_dequantize(q.weight, q.weight_scale).numpy(), ref.e4m3_decode(codes) * scale)


def test_bf16_weights_divide_in_bf16_as_modelopt_does():
    w = torch.from_numpy(np.random.default_rng(4).normal(0, 1, (128, 64)).astype(np.float32)).bfloat16()
    q = fp8_quantize(w)
    codes, scale = ref.fp8_quantize(w.float().numpy(), bf16_input=True)
    assert q.weight_scale.item() == scale
    np.testing.assert_array_equal(e4m3_to_bits(q.weight).numpy(), codes)


def test_gaussian_relative_error_is_in_the_published_range():
    # research/nvfp4.md §8: FP8 E4M3 per-tensor on N(0,1): rel-RMSE 0.0265, suggested assertion [0.024, 0.029]
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    w_hat = fp8_dequantize(*fp8_quantize(w))
    rel = ((w_hat - w).norm() / w.norm()).item()
    assert 0.024 <= rel <= 0.029, rel


def test_scales_from_amax_and_degenerate_tensors():
    assert fp8_scale_from_amax(torch.tensor(896.0)).item() == 2.0
    s = fp8_input_scale(3.5)
    assert s.dtype == torch.float32 and s.shape == () and s.item() == np.float32(3.5) / np.float32(448)
    with pytest.raises(ValueError, match="never seen during calibration"):
        fp8_input_scale(0.0)
    zero = fp8_quantize(torch.zeros(4, 8))
    assert zero.weight_scale.item() == 0 and not e4m3_to_bits(zero.weight).any()
    assert not fp8_dequantize(*zero).any()
    given = fp8_quantize(torch.tensor([1.0, -2.0, 1000.0]), weight_scale=1.0)  # out of range saturates
    assert e4m3_decode(given.weight).tolist() == [1.0, -2.0, 448.0]
