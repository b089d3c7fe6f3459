"""Fake quantization with a straight-through estimator and the NVFP4 training-recipe options (research/nvfp4.md §7)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.quant.fake_quant import (
    FakeQuantConfig,
    FakeQuantLinear,
    apply_rht,
    fake_quantize,
    hadamard_matrix,
    high_precision_layers,
    random_hadamard_matrix,
)
from nemotron3.quant.fp8 import fp8_dequantize, fp8_quantize
from nemotron3.quant.nvfp4 import nvfp4_block_scales, nvfp4_dequantize, nvfp4_fake_quantize, nvfp4_quantize


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_forward_is_the_checkpoint_rounding_and_the_gradient_is_identity():
    x = torch.randn(6, 64, generator=_g(0), requires_grad=True)
    upstream = torch.randn(6, 64, generator=_g(1))
    for fmt, expected in (("nvfp4", nvfp4_dequantize(*nvfp4_quantize(x.detach()))),
                          ("fp8", fp8_dequantize(*fp8_quantize(x.detach())))):  # fmt: skip
        x.grad = None
        y = fake_quantize(x, fmt)
        assert torch.equal(y, expected) and not torch.equal(y, x)
        y.backward(upstream)
        assert torch.equal(x.grad, upstream)  # straight through: identity
    tiles = fake_quantize(x, "nvfp4")  # 1x16 blocks by default
    assert torch.equal(tiles, nvfp4_fake_quantize(x.detach()))


def test_qat_linear_quantizes_weight_and_input_and_keeps_checkpoint_names():
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    layer = FakeQuantLinear.from_linear(base, FakeQuantConfig(weight="nvfp4", input="fp8"))
    assert layer.weight is base.weight and layer.bias is base.bias  # the same Parameters: optimizer state stays
    assert set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    w_q = nvfp4_fake_quantize(base.weight.detach())
    x_q = fp8_dequantize(*fp8_quantize(x.detach()))
    assert torch.equal(y, F.linear(x_q, w_q, base.bias))
    dy = torch.randn_like(y)
    y.backward(dy)
    # STE: dW = dyᵀ · Q(x), dx = dy · Q(W) (the quantizers pass the gradient through unchanged)
    torch.testing.assert_close(base.weight.grad, dy.reshape(-1, 32).t() @ x_q.reshape(-1, 64))
    torch.testing.assert_close(x.grad, dy @ w_q)
    fp32_default = FakeQuantLinear(64, 32)
    assert fp32_default.config.weight == "nvfp4" and fp32_default.config.input is None


def test_hadamard_is_orthogonal_and_cancels_inside_a_gemm():
    h = hadamard_matrix(16)
    assert torch.equal(h @ h.t(), 16 * torch.eye(16)) and set(h.unique().tolist()) == {-1.0, 1.0}
    r = random_hadamard_matrix(seed=5)
    torch.testing.assert_close(r @ r.t(), torch.eye(16), atol=1e-6, rtol=0)
    assert torch.equal(r, random_hadamard_matrix(seed=5)) and not torch.equal(r, random_hadamard_matrix(seed=6))
    assert torch.allclose(r.abs(), torch.full((16, 16), 0.25))
    a = torch.randn(24, 64, generator=_g(2), dtype=torch.float64)
    b = torch.randn(40, 64, generator=_g(3), dtype=torch.float64)
    r64 = r.double()
    torch.testing.assert_close(apply_rht(a, r64) @ apply_rht(b, r64).t(), a @ b.t(), atol=1e-12, rtol=0)
    a32, b32 = a.float(), b.float()
    rel = (apply_rht(a32, r) @ apply_rht(b32, r).t() - a32 @ b32.t()).abs().max() / (a32 @ b32.t()).abs().max()
    assert rel < 1e-6
    assert not torch.allclose(apply_rht(a32, r), a32)  # it does rotate
    with pytest.raises(ValueError, match="multiple of 16"):
        apply_rht(torch.ones(2, 20), r)


def test_stochastic_rounding_of_nvfp4_is_unbiased_and_seeded():
    # research/nvfp4.md §8 item 6; the block scales are RNE and the same for every copy, so E[x̂] = x
    x = torch.randn(1, 64, generator=_g(4))
    copies = x.repeat(40_000, 1)
    draws = nvfp4_fake_quantize(copies, stochastic=True, generator=_g(0))
    amax = x.abs().max()
    # Unbiased wherever |x| <= 6·d_b; a block max whose E4M3 scale rounded down saturates at 6·d_b (biased
    # by the scale's rounding, < 2^-4 relative), so those elements are checked against 6·d_b instead.
    scale, s2 = nvfp4_block_scales(x)
    limit = (6 * scale.float() * s2).repeat_interleave(16, -1)[0]
    inside = x[0].abs() <= limit
    assert inside.sum() >= 60
    assert ((draws.mean(0) - x[0]).abs()[inside] <= 0.01 * amax).all()
    saturated = x[0].sign() * limit
    assert ((draws.mean(0) - saturated).abs()[~inside] <= 0.01 * amax).all()
    rne = nvfp4_fake_quantize(x)[0]
    assert ((draws.mean(0) - x[0]).abs().mean() < 0.2 * (rne - x[0]).abs().mean())  # much less biased than RNE
    again = nvfp4_fake_quantize(copies[:100], stochastic=True, generator=_g(0))
    assert torch.equal(again, draws[:100])


def test_high_precision_layers_keep_the_last_15_percent():
    assert high_precision_layers(108) == set(range(92, 108))  # Ultra: the final 16 of 108 layers
    assert high_precision_layers(88, last=14) == set(range(74, 88))  # Super: last 14 of 88
    assert high_precision_layers(62, first=2, last=8) == {0, 1} | set(range(54, 62))  # the 12B run
    assert high_precision_layers(20) == {17, 18, 19}
    assert high_precision_layers(4, fraction=0.0) == set()
    with pytest.raises(ValueError):
        high_precision_layers(10, fraction=1.5)


def test_config_validation_names_the_missing_switch():
    with pytest.raises(ValueError, match="gradient='nvfp4'"):
        FakeQuantConfig(rht=True)
    with pytest.raises(ValueError, match="weight='nvfp4'"):
        FakeQuantConfig(weight="fp8", weight_2d=True)
    with pytest.raises(ValueError, match="one of"):
        FakeQuantConfig(weight="int4")
    with pytest.raises(ValueError, match="in_features % 16"):
        FakeQuantLinear(40, 32)
    with pytest.raises(ValueError, match="out_features % 16"):
        FakeQuantLinear(64, 40, config=FakeQuantConfig(gradient="nvfp4"))


def _manual_training_grads(x, w, dy, cfg, rht):
    """dx and dW of the recipe written out directly (research/nvfp4.md §7, small-scale emulation)."""
    q = nvfp4_fake_quantize
    w_dgrad = q(w, block_rows=16) if cfg.weight_2d else q(w.t()).t()
    dx = q(dy) @ w_dgrad
    a, b = dy.t(), x.t()
    if rht is not None:
        a, b = apply_rht(a, rht), apply_rht(b, rht)
    return dx, q(a) @ q(b).t()


@pytest.mark.parametrize("weight_2d,rht", [(False, False), (True, True)])
def test_training_recipe_backward_quantizes_all_three_gemms(weight_2d, rht):
    cfg = FakeQuantConfig(weight="nvfp4", input="nvfp4", gradient="nvfp4", weight_2d=weight_2d, rht=rht, seed=9)
    layer = FakeQuantLinear(64, 32, bias=False, config=cfg)
    x = torch.randn(48, 64, generator=_g(5), requires_grad=True)
    y = layer(x)
    w = layer.weight.detach()
    assert torch.equal(y, nvfp4_fake_quantize(x.detach()) @ nvfp4_fake_quantize(w, block_rows=16 if weight_2d else 1).t())
    dy = torch.randn(48, 32, generator=_g(6))
    y.backward(dy)
    dx, dw = _manual_training_grads(x.detach(), w, dy, cfg, random_hadamard_matrix(9) if rht else None)
    assert torch.equal(x.grad, dx) and torch.equal(layer.weight.grad, dw)
    exact = dy.t() @ x.detach()
    rel = ((layer.weight.grad - exact).norm() / exact.norm()).item()
    assert 0.05 < rel < 0.3, rel  # quantized operands: an error, but of NVFP4 size


def test_stochastic_rounding_in_the_layer_is_seeded_and_tokens_are_padded():
    cfg = FakeQuantConfig.nvfp4_pretraining(seed=3)
    x = torch.randn(2, 13, 64, generator=_g(7))  # 26 tokens: Wgrad pads the token dimension to 32
    grads = []
    for seed in (11, 11, 12):
        torch.manual_seed(0)
        layer = FakeQuantLinear(64, 32, config=cfg, seed=seed)
        layer(x).square().sum().backward()
        grads.append(layer.weight.grad.clone())
        assert layer.bias.grad is not None and layer.bias.grad.shape == (32,)
    assert torch.equal(grads[0], grads[1]) and not torch.equal(grads[0], grads[2])
    clone = copy.deepcopy(layer)  # the generator is not part of the copied state
    assert clone(x).shape == (2, 13, 32)
