"""Weight-only quantized linear layers: NVFP4 (W4A16) and FP8 (W8A16).

The weights stay packed in memory exactly as a ModelOpt checkpoint stores them (buffer names = the
safetensors suffixes, so `state_dict()` is the on-disk layout), and every forward dequantizes:

    y = x · Ŵᵀ + b,   Ŵ = nvfp4_dequantize(weight, weight_scale, weight_scale_2)  or  float(weight) · weight_scale

Activations are not quantized (a checkpoint's `input_scale` is kept for round trips but unused), as
vLLM's Marlin W4A16 path on Hopper computes it (research/nvfp4.md §6). Two dequantization strategies:

* "layer": dequantize the whole weight, then one matmul (transient memory: one dense weight).
* "tile":  dequantize `tile_rows` output rows at a time and multiply each tile while it is in cache
           (transient memory: one tile).

Both give F.linear(x, dequantize()) (the "layer" strategy bit for bit); which is faster on CPU is
measured by `python -m nemotron3.quant.linear` (numbers in docs/quantization.md).
"""

from __future__ import annotations

import time
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.quant.fp8 import FP8_DTYPE, as_scale, fp8_dequantize, fp8_quantize
from nemotron3.quant.nvfp4 import NVFP4_BLOCK, _check_packed, dequantize_unchecked, nvfp4_quantize

Strategy = Literal["layer", "tile"]
STRATEGIES = ("layer", "tile")
TILE_ELEMENTS = 2**18  # default tile: 256 Ki weights = 1 MiB of float32, about an L2 cache


class _DequantLinear(nn.Module):
    """Shared forward of the weight-only layers; subclasses define `_dequantize_rows(start, stop, dtype)`."""

    in_features: int
    out_features: int

    def _init_common(self, in_features: int, out_features: int, strategy: Strategy, tile_rows: int | None) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if tile_rows is not None and tile_rows < 1:
            raise ValueError(f"tile_rows must be >= 1, got {tile_rows}")
        self.in_features, self.out_features = in_features, out_features
        self.strategy: Strategy = strategy
        self.tile_rows = tile_rows if tile_rows is not None else max(1, TILE_ELEMENTS // in_features)

    def _dequantize_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [out_features, in_features] in `dtype` (computed in float32, then cast)."""
        return self._dequantize_rows(0, self.out_features, dtype)

    def to_linear(self, dtype: torch.dtype = torch.bfloat16) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight (the dequantize-to-BF16 export)."""
        layer = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta", dtype=dtype)
        layer.weight = nn.Parameter(self.dequantize(dtype))
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.to(dtype))
        return layer

    def quantized_nbytes(self) -> int:
        """Bytes of the quantized weight tensors as they sit in memory (weight + its scales; not bias)."""
        names = ("weight", "weight_scale", "weight_scale_2")
        return sum(t.numel() * t.element_size() for n in names if (t := getattr(self, n)) is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x's dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: expected input [..., {self.in_features}], got {tuple(x.shape)}")
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self.strategy == "layer":
            return F.linear(x, self.dequantize(x.dtype), bias)
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for start in range(0, self.out_features, self.tile_rows):
            stop = min(start + self.tile_rows, self.out_features)
            tile_bias = bias[start:stop] if bias is not None else None
            out[..., start:stop] = F.linear(x, self._dequantize_rows(start, stop, x.dtype), tile_bias)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"strategy={self.strategy}" + (f", tile_rows={self.tile_rows}" if self.strategy == "tile" else ""))  # fmt: skip


def _float_weight(weight: torch.Tensor | nn.Linear, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(weight, nn.Linear):
        if bias is not None:
            raise ValueError("pass either an nn.Linear or a weight and a bias, not an nn.Linear and a bias")
        weight, bias = weight.weight, weight.bias
    if weight.ndim != 2:
        raise ValueError(f"a linear weight is 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    return weight.detach(), None if bias is None else bias.detach()


class NVFP4Linear(_DequantLinear):
    """W4A16 linear layer: NVFP4 weight resident (4.5 bits/weight), dequantized on the fly.

    Buffers (ModelOpt names): weight uint8 [out, in/2], weight_scale float8_e4m3fn [out, in/16],
    weight_scale_2 float32 [], optional input_scale float32 [] (W4A4 checkpoints; unused here), bias.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, strategy: Strategy = "layer",
                 tile_rows: int | None = None, device: torch.device | str | None = None) -> None:  # fmt: skip
        super().__init__()
        if in_features % NVFP4_BLOCK:
            raise ValueError(
                f"NVFP4 needs in_features to be a multiple of {NVFP4_BLOCK}, got {in_features}: keep this layer "
                "in BF16/FP8 (or zero-pad the input dimension)"
            )
        self._init_common(in_features, out_features, strategy, tile_rows)
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        scale = torch.ones(out_features, in_features // NVFP4_BLOCK, device=device).to(FP8_DTYPE)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_scale_2", torch.ones((), device=device))
        self.register_buffer("input_scale", None)
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_float(cls, weight: torch.Tensor | nn.Linear, bias: torch.Tensor | None = None, *,
                   weight_scale_2: torch.Tensor | float | None = None, strategy: Strategy = "layer",
                   tile_rows: int | None = None) -> NVFP4Linear:  # fmt: skip
        """Quantize a float weight [out, in] (or an nn.Linear) with ModelOpt's max scaling (nvfp4_quantize)."""
        w, b = _float_weight(weight, bias)
        q = nvfp4_quantize(w, weight_scale_2)
        return cls.from_packed(q.weight, q.weight_scale, q.weight_scale_2, b, strategy=strategy, tile_rows=tile_rows)

    @classmethod
    def from_packed(cls, weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor | float,
                    bias: torch.Tensor | None = None, *, input_scale: torch.Tensor | float | None = None,
                    strategy: Strategy = "layer", tile_rows: int | None = None) -> NVFP4Linear:  # fmt: skip
        """Wrap checkpoint tensors (kept as given, not copied): weight uint8 [out, in/2], weight_scale
        float8_e4m3fn [out, in/16], weight_scale_2 and input_scale float32 scalars."""
        if weight.ndim != 2:
            raise ValueError(f"NVFP4Linear weight must be uint8 [out, in/2], got shape {tuple(weight.shape)}")
        _check_packed(weight, weight_scale, weight_scale_2)
        out_features, in_features = weight.shape[0], weight.shape[1] * 2
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        layer = cls(in_features, out_features, bias is not None, strategy=strategy, tile_rows=tile_rows, device="meta")
        layer.weight, layer.weight_scale = weight, weight_scale
        layer.weight_scale_2 = as_scale(weight_scale_2, "weight_scale_2").to(weight.device)
        if input_scale is not None:
            layer.input_scale = as_scale(input_scale, "input_scale").to(weight.device)
        layer.bias = None if bias is None else bias.detach()
        return layer

    def _dequantize_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_unchecked(self.weight[start:stop], self.weight_scale[start:stop], self.weight_scale_2, dtype)


class FP8Linear(_DequantLinear):
    """W8A16 linear layer: per-tensor FP8 weight resident (8 bits/weight), dequantized on the fly.

    Buffers (ModelOpt names): weight float8_e4m3fn [out, in], weight_scale float32 [],
    optional input_scale float32 [] (W8A8 checkpoints; unused here), bias.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, strategy: Strategy = "layer",
                 tile_rows: int | None = None, device: torch.device | str | None = None) -> None:  # fmt: skip
        super().__init__()
        self._init_common(in_features, out_features, strategy, tile_rows)
        self.register_buffer("weight", torch.zeros(out_features, in_features, device=device).to(FP8_DTYPE))
        self.register_buffer("weight_scale", torch.ones((), device=device))
        self.register_buffer("input_scale", None)
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    weight_scale_2 = None  # FP8 has one scale level; keeps quantized_nbytes() generic

    @classmethod
    def from_float(cls, weight: torch.Tensor | nn.Linear, bias: torch.Tensor | None = None, *,
                   weight_scale: torch.Tensor | float | None = None, strategy: Strategy = "layer",
                   tile_rows: int | None = None) -> FP8Linear:  # fmt: skip
        """Quantize a float weight [out, in] (or an nn.Linear) per tensor: weight_scale = amax/448 (fp8_quantize)."""
        w, b = _float_weight(weight, bias)
        q = fp8_quantize(w, weight_scale)
        return cls.from_packed(q.weight, q.weight_scale, b, strategy=strategy, tile_rows=tile_rows)

    @classmethod
    def from_packed(cls, weight: torch.Tensor, weight_scale: torch.Tensor | float, bias: torch.Tensor | None = None,
                    *, input_scale: torch.Tensor | float | None = None, strategy: Strategy = "layer",
                    tile_rows: int | None = None) -> FP8Linear:  # fmt: skip
        """Wrap checkpoint tensors: weight float8_e4m3fn [out, in], weight_scale / input_scale float32 scalars."""
        if weight.dtype != FP8_DTYPE or weight.ndim != 2:
            raise ValueError(f"FP8Linear weight must be float8_e4m3fn [out, in], got {weight.dtype} {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        layer = cls(in_features, out_features, bias is not None, strategy=strategy, tile_rows=tile_rows, device="meta")
        layer.weight = weight
        layer.weight_scale = as_scale(weight_scale, "weight_scale").to(weight.device)
        if input_scale is not None:
            layer.input_scale = as_scale(input_scale, "input_scale").to(weight.device)
        layer.bias = None if bias is None else bias.detach()
        return layer

    def _dequantize_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return fp8_dequantize(self.weight[start:stop], self.weight_scale, dtype)


def time_strategies(out_features: int, in_features: int, rows: int, *, repeats: int = 5,
                    tile_rows: int | None = None, seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Median milliseconds of one forward with `rows` input rows: dense fp32 F.linear vs the strategies."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.02
    x = torch.randn(rows, in_features, generator=g)
    layers = {
        "fp32 dense": lambda t: F.linear(t, w),
        **{f"nvfp4 {s}": NVFP4Linear.from_float(w, strategy=s, tile_rows=tile_rows) for s in STRATEGIES},
        **{f"fp8 {s}": FP8Linear.from_float(w, strategy=s, tile_rows=tile_rows) for s in STRATEGIES},
    }
    result = {}
    with torch.inference_mode():
        for name, layer in layers.items():
            layer(x)  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                layer(x)
                times.append(time.perf_counter() - t0)
            result[name] = sorted(times)[len(times) // 2] * 1e3
    return result


def _main() -> None:
    """Print the W4A16 / W8A16 strategy measurement as a markdown table (docs/quantization.md)."""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    cases = [(2048, 2048, 1), (2048, 2048, 512), (32000, 512, 1), (32000, 512, 512)]
    header = None
    for out_f, in_f, rows in cases:
        r = time_strategies(out_f, in_f, rows)
        if header is None:
            header = list(r)
            print("| weight [out, in] | rows | " + " | ".join(f"{h} (ms)" for h in header) + " |")
            print("|---|---|" + "---|" * len(header))
        print(f"| {out_f} x {in_f} | {rows} | " + " | ".join(f"{r[h]:.2f}" for h in header) + " |")


if __name__ == "__main__":
    _main()
