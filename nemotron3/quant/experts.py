"""Quantized routed experts: packed NVFP4 / FP8 weights stacked per layer, dequantized on the fly.

A drop-in for `nemotron3.model.moe.Experts` (same forward signature and math): `mixer.experts` becomes a
`QuantizedExperts` whose `up_proj` / `down_proj` children hold the ModelOpt tensors of every expert
stacked along a leading expert axis, so the in-memory names mirror the per-expert names on disk:

    on disk  …experts.{e}.up_proj.weight        uint8 [F, L/2]     (NVFP4)  or float8_e4m3fn [F, L] (FP8)
             …experts.{e}.up_proj.weight_scale  float8 [F, L/16]   (NVFP4)  or float32 []           (FP8)
             …experts.{e}.up_proj.weight_scale_2 float32 []        (NVFP4 only)
             …experts.{e}.up_proj.input_scale   float32 []         (W4A4 / W8A8 checkpoints; unused, W4A16)
    memory   …experts.up_proj.weight            [E, F, L/2] / [E, F, L], weight_scale [E, F, L/16] / [E],
             …experts.up_proj.weight_scale_2    [E], input_scale [E]

Strategies (how the forward dequantizes; all give exactly `F.linear(x, Ŵ_e)` per expert):

* "expert": dequantize one routed expert's two matrices right before its matmuls, only for experts
  that received tokens (transient memory: one expert).
* "active": gather the packed rows of every expert that received tokens, dequantize them in one
  vectorised call, then run the per-expert matmuls (transient memory: the active experts).
* "layer": dequantize all E experts of the layer in one call, then run the per-expert matmuls.

Measured on this machine (2 CPU threads shared with another job, so noisy; torch 2.13,
`python -m nemotron3.quant.experts`; nemo50-sized layer: E=16, L=256, F=384, top-4; median of 7
interleaved repeats, ms per forward):

    tokens | fp32 dense | nvfp4 expert | nvfp4 active | nvfp4 layer | fp8 expert | fp8 active | fp8 layer
         1 |      0.76  |       5.76   |       6.71   |      23.09  |     6.09   |    10.32   |    47.86
         8 |     46.1   |      48.2    |      28.4    |      24.6   |    72.2    |    41.5    |    28.6
       512 |     23.3   |      51.4    |      37.5    |      36.0   |    46.6    |    42.2    |    71.8

"expert" and "active" are close when few experts are hit (decode); "active" and "layer" win once most
experts receive tokens, where "expert" pays one dequantization call per expert. DEFAULT_STRATEGY is
"active": never far from the best in any row. A second run under heavier contention measured, at 1
token, active 2.1 ms, expert 12.4, layer 36.3 (nvfp4), and was too noisy to rank the other rows.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.model.mlp import relu2
from nemotron3.quant.fp8 import FP8_DTYPE, e4m3_decode
from nemotron3.quant.nvfp4 import NVFP4_BLOCK, dequantize_unchecked

ExpertStrategy = Literal["expert", "active", "layer"]
EXPERT_STRATEGIES = ("expert", "active", "layer")
DEFAULT_STRATEGY: ExpertStrategy = "active"
FORMATS = ("nvfp4", "fp8")


class StackedQuantWeight(nn.Module):
    """The packed weights of one projection of every expert: weight [E, out, in/2] uint8 (nvfp4) or
    [E, out, in] float8_e4m3fn (fp8), weight_scale [E, out, in/16] float8 (nvfp4) or [E] float32 (fp8),
    weight_scale_2 [E] float32 (nvfp4), input_scale [E] float32 or None."""

    def __init__(self, fmt: str, weight: torch.Tensor, weight_scale: torch.Tensor,
                 weight_scale_2: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> None:  # fmt: skip
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        E = weight.shape[0]
        if fmt == "nvfp4":
            ok = (weight.dtype == torch.uint8 and weight.ndim == 3 and weight_scale.dtype == FP8_DTYPE
                  and tuple(weight_scale.shape) == (E, weight.shape[1], weight.shape[2] * 2 // NVFP4_BLOCK)
                  and weight_scale_2 is not None and tuple(weight_scale_2.shape) == (E,))  # fmt: skip
            if not ok:
                raise ValueError(
                    "stacked NVFP4 experts need weight uint8 [E, out, in/2], weight_scale float8_e4m3fn "
                    f"[E, out, in/16], weight_scale_2 [E]; got {weight.dtype} {tuple(weight.shape)}, "
                    f"{weight_scale.dtype} {tuple(weight_scale.shape)}, "
                    f"{None if weight_scale_2 is None else tuple(weight_scale_2.shape)}"
                )
            self.in_features = weight.shape[2] * 2
        else:
            if weight.dtype != FP8_DTYPE or weight.ndim != 3 or tuple(weight_scale.shape) != (E,):
                raise ValueError(
                    "stacked FP8 experts need weight float8_e4m3fn [E, out, in] and weight_scale [E]; got "
                    f"{weight.dtype} {tuple(weight.shape)}, {tuple(weight_scale.shape)}"
                )
            self.in_features = weight.shape[2]
        self.format = fmt
        self.num_experts, self.out_features = E, weight.shape[1]
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale if fmt == "nvfp4" else weight_scale.float())
        self.register_buffer("weight_scale_2", None if weight_scale_2 is None else weight_scale_2.float())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float())

    def dequantize(self, experts: torch.Tensor | int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense weights of `experts` (an index → [out, in]; an index tensor → [n, out, in]; None → all)."""
        if experts is None:
            w, s = self.weight, self.weight_scale
            s2 = self.weight_scale_2
        else:
            w, s = self.weight[experts], self.weight_scale[experts]
            s2 = None if self.weight_scale_2 is None else self.weight_scale_2[experts]
        if self.format == "nvfp4":
            # one global scale per expert, broadcast over [out, in/16]
            return dequantize_unchecked(w, s, s2[..., None, None] if s2.ndim else s2, dtype)
        out = e4m3_decode(w).mul_(s[..., None, None] if s.ndim else s)
        return out if dtype == torch.float32 else out.to(dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.weight_scale, self.weight_scale_2)
                   if t is not None)  # fmt: skip

    def extra_repr(self) -> str:
        return f"{self.format}, experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}"


class QuantizedExperts(nn.Module):
    """Routed experts with resident packed weights (W4A16 / W8A16); forward as `model.moe.Experts`."""

    def __init__(self, up_proj: StackedQuantWeight, down_proj: StackedQuantWeight,
                 strategy: ExpertStrategy = DEFAULT_STRATEGY) -> None:  # fmt: skip
        super().__init__()
        if strategy not in EXPERT_STRATEGIES:
            raise ValueError(f"strategy must be one of {EXPERT_STRATEGIES}, got {strategy!r}")
        if up_proj.num_experts != down_proj.num_experts or up_proj.out_features != down_proj.in_features:
            raise ValueError("up_proj [E, F, L] and down_proj [E, L, F] do not fit together")
        self.up_proj, self.down_proj = up_proj, down_proj
        self.strategy: ExpertStrategy = strategy
        self.num_experts = up_proj.num_experts

    @classmethod
    def from_float(cls, up: torch.Tensor, down: torch.Tensor, fmt: str = "nvfp4",
                   strategy: ExpertStrategy = DEFAULT_STRATEGY) -> QuantizedExperts:  # fmt: skip
        """Quantize stacked float experts (up [E, F, L], down [E, L, F]) one expert at a time (per-expert scales)."""
        return cls(quantize_stacked(up, fmt), quantize_stacked(down, fmt), strategy)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [E, F, L], down [E, L, F]) dense."""
        return self.up_proj.dequantize(None, dtype), self.down_proj.dequantize(None, dtype)

    def quantized_nbytes(self) -> int:
        return self.up_proj.nbytes() + self.down_proj.nbytes()

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Σ_j w_j · down_e(relu(up_e(x))²) over each token's experts, accumulated in fp32.

        x: [T, L]; weights: [T, k] fp32; indices: [T, k]. Returns [T, L] float32 (as Experts.forward).
        """
        T, k = indices.shape
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // k
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        active = [e for e, n in enumerate(counts) if n]
        if self.strategy == "layer":
            ups, downs = self.up_proj.dequantize(None, x.dtype), self.down_proj.dequantize(None, x.dtype)
            slot = dict(zip(range(self.num_experts), range(self.num_experts)))
        elif self.strategy == "active":
            idx = torch.tensor(active, device=x.device)
            ups, downs = self.up_proj.dequantize(idx, x.dtype), self.down_proj.dequantize(idx, x.dtype)
            slot = {e: i for i, e in enumerate(active)}
        xs = x[token]
        ys = torch.empty_like(xs)
        start = 0
        for e in active:
            n = counts[e]
            seg = xs[start : start + n]
            if self.strategy == "expert":
                up, down = self.up_proj.dequantize(e, x.dtype), self.down_proj.dequantize(e, x.dtype)
            else:
                up, down = ups[slot[e]], downs[slot[e]]
            ys[start : start + n] = F.linear(relu2(F.linear(seg, up)), down)
            start += n
        out = x.new_zeros(T, x.shape[-1], dtype=torch.float32)
        out.index_add_(0, token, ys.float() * weights.reshape(-1)[order, None])
        return out

    def extra_repr(self) -> str:
        return f"strategy={self.strategy}"


def quantize_stacked(w: torch.Tensor, fmt: str, input_amax: torch.Tensor | None = None) -> StackedQuantWeight:
    """Quantize [E, out, in] expert by expert (each its own weight_scale_2 / weight_scale, as ModelOpt exports)."""
    from nemotron3.quant.fp8 import fp8_input_scale, fp8_quantize
    from nemotron3.quant.nvfp4 import nvfp4_input_scale, nvfp4_quantize

    parts = [nvfp4_quantize(w[e]) if fmt == "nvfp4" else fp8_quantize(w[e]) for e in range(w.shape[0])]
    inp = None
    if input_amax is not None:
        to_scale = nvfp4_input_scale if fmt == "nvfp4" else fp8_input_scale
        inp = torch.stack([to_scale(a) for a in input_amax])
    if fmt == "nvfp4":
        return StackedQuantWeight(
            fmt, torch.stack([p.weight for p in parts]), torch.stack([p.weight_scale for p in parts]),
            torch.stack([p.weight_scale_2 for p in parts]), inp,
        )  # fmt: skip
    return StackedQuantWeight(fmt, torch.stack([p.weight for p in parts]), torch.stack([p.weight_scale for p in parts]),
                              None, inp)  # fmt: skip


# ------------------------------------------------------------------------------------------ measurement


def time_expert_strategies(E: int = 16, L: int = 256, F_: int = 384, k: int = 4, tokens: int = 1, *,
                           repeats: int = 7, seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Median ms of one routed-experts forward: dense fp32 Experts vs each format × strategy."""
    from nemotron3.model.moe import Experts

    g = torch.Generator().manual_seed(seed)
    up, down = torch.randn(E, F_, L, generator=g) * 0.02, torch.randn(E, L, F_, generator=g) * 0.02
    dense = Experts(E, L, F_)
    dense.up_proj.data, dense.down_proj.data = up, down
    x = torch.randn(tokens, L, generator=g)
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    layers: dict[str, nn.Module] = {"fp32 dense": dense}
    for fmt in FORMATS:
        packed = QuantizedExperts.from_float(up, down, fmt)
        for s in EXPERT_STRATEGIES:
            layers[f"{fmt} {s}"] = QuantizedExperts(packed.up_proj, packed.down_proj, s)
    times: dict[str, list[float]] = {name: [] for name in layers}
    with torch.inference_mode():
        for layer in layers.values():
            layer(x, weights, indices)
        for _ in range(repeats):  # interleaved: each repeat times every variant once
            for name, layer in layers.items():
                t0 = time.perf_counter()
                layer(x, weights, indices)
                times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}


def _main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; E=16, L=256, F=384, top-4")
    header = None
    for tokens in (1, 8, 64, 512):
        r = time_expert_strategies(tokens=tokens)
        if header is None:
            header = list(r)
            print("| tokens | " + " | ".join(f"{h} (ms)" for h in header) + " |")
            print("|---|" + "---|" * len(header))
        print(f"| {tokens} | " + " | ".join(f"{r[h]:.3f}" for h in header) + " |")


if __name__ == "__main__":
    _main()
