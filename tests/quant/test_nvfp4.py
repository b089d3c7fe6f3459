"""NVFP4 two-level quantization: ModelOpt golden vectors, the independent reference, error bounds (research/nvfp4.md)."""

import numpy as np
import pytest
import torch

from nemotron3.quant.fp4 import unpack_fp4
from nemotron3.quant.fp8 import e4m3_decode, e4m3_to_bits
from nemotron3.quant.nvfp4 import (
    nvfp4_block_scales,
    nvfp4_dequantize,
    nvfp4_encode,
    nvfp4_fake_quantize,
    nvfp4_global_scale,
    nvfp4_input_scale,
    nvfp4_quantize,
)
from tests.quant import reference as ref


def _assert_matches_reference(x: torch.Tensor, weight_scale_2=None, block_rows: int = 1) -> None:
    q = nvfp4_quantize(x, weight_scale_2, block_rows=block_rows)
    matrix = x.float().reshape(-1, x.shape[-1]).numpy()
    packed, scale_codes, s2 = ref.nvfp4_quantize(matrix, weight_scale_2, block_rows)
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (*x.shape[:-1], x.shape[-1] // 2)
    assert q.weight_scale.dtype == torch.float8_e4m3fn and q.weight_scale.shape == (*x.shape[:-1], x.shape[-1] // 16)
    assert q.weight_scale_2.dtype == torch.float32 and q.weight_scale_2.shape == ()
    assert q.weight_scale_2.item() == s2
    np.testing.assert_array_equal(e4m3_to_bits(q.weight_scale).reshape(-1, x.shape[-1] // 16).numpy(), scale_codes)
    np.testing.assert_array_equal(q.weight.reshape(-1, x.shape[-1] // 2).numpy(), packed)
    ours = nvfp4_dequantize(*q).reshape(matrix.shape).numpy()
    np.testing.assert_array_equal(ours, ref.nvfp4_dequantize(packed, scale_codes, s2))


def test_modelopt_golden_vectors():
    # research/nvfp4.md §2.1, produced with ModelOpt 0.47
    w = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, -6]])
    for x in (w, w.bfloat16(), w * 2**-7):
        q = nvfp4_quantize(x)
        assert bytes(q.weight[0].tolist()) == bytes.fromhex("20 42 64 76 A8 CA EC FE")
        assert e4m3_to_bits(q.weight_scale).tolist() == [[0x7E]]
    assert nvfp4_quantize(w).weight_scale_2.item() == np.float32(6) / np.float32(2688)
    x = torch.zeros(1, 16)
    x[0, :3] = torch.tensor([6.0, -0.5, 1.0])
    assert bytes(nvfp4_quantize(x).weight[0].tolist()) == bytes.fromhex("97 02 00 00 00 00 00 00")
    torch.manual_seed(0)
    x = torch.randn(2, 32)
    q = nvfp4_quantize(x)
    assert q.weight_scale_2.item() == 0.0012687882408499718
    assert e4m3_to_bits(q.weight_scale).flatten().tolist() == [0x79, 0x77, 0x79, 0x7E]
    assert q.weight[0].tolist() == [221, 169, 68, 250, 210, 34, 81, 149, 254, 84, 244, 122, 196, 25, 118, 213]


def _tensor(kind: str, rng: np.random.Generator) -> np.ndarray:
    shape = (48, 256)
    if kind == "normal":
        return rng.normal(0, 0.02, shape)
    if kind == "student_t":  # heavy tails
        return rng.standard_t(3, shape)
    x = rng.normal(0, 1, shape)
    if kind == "zero_blocks":
        x[::3, 16:64] = 0.0
        x[5] = 0.0
    elif kind == "outlier_blocks":  # one huge element per chosen block: the rest of the block flushes
        x[::4, 37] = 1e4
        x[1::4, 200] = -3e3
    elif kind == "saturation":  # exact grid points and ties after scaling, the tensor max in many blocks
        x[:, ::16] = 6.0
        x[:, 1::16] = rng.choice([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0], size=(shape[0], shape[1] // 16))
    elif kind == "tiny":  # float32 subnormals and blocks far below the tensor amax (block scale clamps at 2^-9)
        x[:8] *= 1e-41
        x[8:16] *= 1e-6
        x[0, 0] = 1e3
    return x


@pytest.mark.parametrize("kind", ["normal", "student_t", "zero_blocks", "outlier_blocks", "saturation", "tiny"])
def test_codes_and_scales_match_the_reference(kind):
    x = torch.from_numpy(_tensor(kind, np.random.default_rng(7)).astype(np.float32))
    _assert_matches_reference(x)


def test_bf16_3d_and_given_global_scale_match_the_reference():
    rng = np.random.default_rng(8)
    x = torch.from_numpy(rng.normal(0, 1, (4, 16, 64)).astype(np.float32))
    _assert_matches_reference(x.bfloat16())  # stacked experts [E, out, in]: one tensor scale, blocks per row
    _assert_matches_reference(x)
    _assert_matches_reference(x[0], weight_scale_2=0.01)  # shared by fused shards: larger than amax/2688
    _assert_matches_reference(x[0], weight_scale_2=1e-4)  # smaller: block scales clamp at 448, elements at 6


def test_all_zero_tensor_quantizes_to_zero():
    q = nvfp4_quantize(torch.zeros(2, 32))
    assert q.weight_scale_2.item() == 0 and not q.weight.any()
    assert e4m3_decode(q.weight_scale).eq(1.0).all()  # the all-zero-block rule (ModelOpt would give NaN here)
    assert not nvfp4_dequantize(*q).any()
    _assert_matches_reference(torch.zeros(2, 32))


def test_inf_nan_and_bad_shapes_are_rejected_with_what_to_do():
    x = torch.randn(4, 32)
    x[2, 5] = float("inf")
    with pytest.raises(ValueError, match=r"inf/NaN.*index \(2, 5\)"):
        nvfp4_quantize(x)
    x[2, 5] = float("nan")
    with pytest.raises(ValueError, match="inf/NaN"):
        nvfp4_fake_quantize(x)
    with pytest.raises(ValueError, match="multiple of 16.*Zero-pad"):
        nvfp4_quantize(torch.randn(4, 40))
    with pytest.raises(ValueError, match="16x16"):
        nvfp4_quantize(torch.randn(8, 32), block_rows=16)
    with pytest.raises(TypeError, match="bf16/fp16/fp32"):
        nvfp4_quantize(torch.ones(4, 16, dtype=torch.int32))
    q = nvfp4_quantize(torch.randn(4, 32))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        nvfp4_dequantize(q.weight, e4m3_to_bits(q.weight_scale), q.weight_scale_2)
    with pytest.raises(ValueError, match="shapes do not match"):
        nvfp4_dequantize(q.weight, q.weight_scale[:, :1], q.weight_scale_2)
    with pytest.raises(ValueError, match="never seen during calibration"):
        nvfp4_input_scale(0.0)


def test_requantizing_the_dequantized_tensor_is_idempotent():
    # research/nvfp4.md §1.3: max-rule re-quantization reproduces codes and scales exactly, up to the sign of
    # zero: a small negative value is stored as 0x8 (-0), which dequantizes to +0 and re-encodes as 0x0.
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    q = nvfp4_quantize(x)
    x_hat = nvfp4_dequantize(*q)
    assert not torch.signbit(x_hat[x_hat == 0]).any()
    q2 = nvfp4_quantize(x_hat)
    codes, codes2 = unpack_fp4(q.weight), unpack_fp4(q2.weight)
    assert (codes == 8).any() and torch.equal(torch.where(codes == 8, 0, codes), codes2)
    assert torch.equal(e4m3_to_bits(q2.weight_scale), e4m3_to_bits(q.weight_scale))
    assert q2.weight_scale_2.item() == q.weight_scale_2.item()
    assert torch.equal(nvfp4_dequantize(*q2), x_hat)


def test_element_error_bound_and_gaussian_relative_error():
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(2))
    x_hat = nvfp4_dequantize(*nvfp4_quantize(x))
    blocks, hat_blocks = x.view(256, 64, 16), x_hat.view(256, 64, 16)
    amax_b = blocks.abs().amax(-1, keepdim=True)
    # research/nvfp4.md §1.3: |x - x̂| <= (1/6)(1 + 2^-4) amax_b ≈ 0.1771 amax_b; block max within 1/17
    assert ((blocks - hat_blocks).abs() <= 0.1772 * amax_b).all()
    at_max = blocks.abs() == amax_b
    assert ((blocks - hat_blocks).abs()[at_max] <= amax_b.expand_as(blocks)[at_max] / 17 * (1 + 1e-6)).all()
    # research/nvfp4.md §8: NVFP4 1x16 max scaling on N(0,1): rel-RMSE 0.0951; assertion range [0.090, 0.100]
    rel = ((x_hat - x).norm() / x.norm()).item()
    assert 0.090 <= rel <= 0.100, rel


def test_16x16_tiles_share_one_scale_and_match_the_reference():
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    q = nvfp4_quantize(x, block_rows=16)
    scales = e4m3_to_bits(q.weight_scale).view(4, 16, 8)
    assert (scales == scales[:, :1]).all()  # one scale per 16x16 tile, repeated over its rows
    _assert_matches_reference(x, block_rows=16)
    # research/nvfp4.md §8: 16x16 2-D scaling on N(0,1) rel-RMSE 0.1114 (worse than 1x16's 0.0951)
    rel = ((nvfp4_dequantize(*q) - x).norm() / x.norm()).item()
    assert 0.105 <= rel <= 0.118, rel


def test_helpers_agree_with_quantize():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    q = nvfp4_quantize(x)
    scales, s2 = nvfp4_block_scales(x)
    assert torch.equal(e4m3_to_bits(scales), e4m3_to_bits(q.weight_scale)) and s2.item() == q.weight_scale_2.item()
    assert nvfp4_global_scale(x.abs().max()).item() == q.weight_scale_2.item()
    codes = nvfp4_encode(x, scales, s2)
    assert torch.equal(codes[:, 0::2] | (codes[:, 1::2] << 4), q.weight)
    assert torch.equal(nvfp4_fake_quantize(x), nvfp4_dequantize(*q))
    assert torch.equal(nvfp4_fake_quantize(x.bfloat16()), nvfp4_dequantize(*nvfp4_quantize(x.bfloat16()), torch.bfloat16))
    assert nvfp4_input_scale(2688.0).item() == 1.0
