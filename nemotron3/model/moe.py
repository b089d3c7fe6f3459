"""LatentMoE: sigmoid router on the full hidden state, relu² experts in the latent width, shared expert.

research/architecture.md §7. Routed experts run only on the tokens routed to them: the (token, expert)
pairs are sorted by expert and each expert with work does one matmul over its contiguous slice. A few
tokens at a time (decode) take the fused native kernel instead (nemotron3/kernels), one call per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.config import ModelConfig
from nemotron3.kernels import native
from nemotron3.model.fused import FusedWeights, apply, fast_path_on, fusable, linear, stack_inputs, stack_outputs
from nemotron3.model.mlp import MLP, relu2, relu2_


def route(
    logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick top_k experts per token; the correction bias only influences which, never the weights.

    logits: [T, E] float32 router logits. Returns weights [T, k] float32 and indices [T, k] int64.
    Group-limited (DeepSeek-V3 style): a group's score is the sum of its best two biased scores, only
    the topk_group best groups stay eligible. Weights are renormalised (+1e-20, as the reference) and
    multiplied by routed_scaling_factor.
    """
    scores = logits.sigmoid()
    choice = scores + correction_bias.float()
    if n_group > 1:
        T, E = choice.shape
        grouped = choice.view(T, n_group, E // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, n_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(T, E)
    indices = choice.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, indices


class Router(nn.Module):
    """`mixer.gate`: weight [E, H] and the selection-only `e_score_correction_bias` [E] (kept fp32)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`route` with this router's settings: logits [T, E] → weights [T, k] fp32, indices [T, k]."""
        return route(
            logits, self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group,
            self.norm_topk_prob, self.routed_scaling_factor,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, H] → weights [T, k] fp32, indices [T, k] int64
        logits = F.linear(x.float(), self.weight.float())
        weights, indices = self.choose(logits)
        if self.training:  # kept for load balancing (nemotron3.train.balance): per-expert load, aux loss
            self.last_scores, self.last_indices = logits.sigmoid(), indices
        return weights, indices


class Experts(nn.Module):
    """Routed experts stacked as up_proj [E, F, L] and down_proj [E, L, F] (on disk: one tensor per expert)."""

    # Up to this many tokens go to the fused kernel (one call, each expert row read once for all its
    # tokens). Isolated, on the AMD dev machine (nemo50's experts, weights cold): 1 token 0.12 vs 0.23 ms
    # for the loop, 4 tokens 0.56 vs 0.80 ms, and from 8 tokens MKL's GEMMs won. Whole engine steps on the
    # Intel machine of 2026-11-30 (A/B in one process): batch 8 20.3 -> 17.5 ms and batch 32 31.7 -> 29.7 ms
    # for nemo50 with the kernel up to 64 tokens, nemo300 within ±2 %. 32 covers decode batches to 32.
    native_max_tokens = 32

    def __init__(self, num_experts: int, in_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, in_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, in_size, intermediate_size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Σ_j w_j · down_e(relu(up_e(x))²) over each token's experts, accumulated in fp32.

        x: [T, L]; weights: [T, k] fp32; indices: [T, k]. Returns [T, L] float32.
        """
        T, k = indices.shape
        if T <= self.native_max_tokens and fast_path_on():
            fused = native.experts(x, self.up_proj, self.down_proj, indices, weights)
            if fused is not None:
                return fused
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
        token = order // k
        counts = torch.bincount(flat, minlength=self.up_proj.shape[0]).tolist()  # one host sync per layer
        ys = self.grouped(x.index_select(0, token), counts)
        in_place = not torch.is_grad_enabled()  # inference: the weights applied in place (same values)
        w = weights.reshape(-1)[order, None]
        ys = ys.float().mul_(w) if in_place else ys.float() * w
        return x.new_zeros(T, x.shape[-1], dtype=torch.float32).index_add_(0, token, ys)

    def grouped(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Each expert over its block of xs [Σ counts, L] (rows sorted by expert, counts[e] of them for expert e):
        down_e(relu(up_e x)²) row by row, two GEMMs per expert with work. relu² runs in place when autograd is off
        (one buffer instead of two; same values)."""
        ys = torch.empty_like(xs)
        in_place = not torch.is_grad_enabled()
        start = 0
        for e, n in enumerate(counts):
            if n:
                h = linear(xs[start : start + n], self.up_proj[e])
                ys[start : start + n] = linear(relu2_(h) if in_place else relu2(h), self.down_proj[e])
                start += n
        return ys


class MoE(nn.Module):
    """The `E` layer's mixer: routed (latent) experts plus one shared relu² expert at full width."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        H, L = config.hidden_size, config.moe_latent_size
        self.gate = Router(config)
        self.experts = Experts(config.n_routed_experts, config.moe_expert_input_size, config.moe_intermediate_size)
        self.shared_experts = MLP(H, config.moe_shared_expert_intermediate_size, bias=config.mlp_bias)
        if L is not None:
            self.fc1_latent_proj = nn.Linear(H, L, bias=config.mlp_bias)
            self.fc2_latent_proj = nn.Linear(L, H, bias=config.mlp_bias)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None

        self._fused: FusedWeights | None = None

    def fuse_projections(self) -> bool:
        """Inference layout (model/fused.py): router | fc1_latent | shared up read x, so they become one
        [E + L + S, H] matrix (one GEMV per decode step instead of three); shared down and fc2_latent become
        one [H, S + L] matrix applied to [relu²(shared) | routed], whose output is their sum. Without latent
        projections (Nano) router | shared up fuse and shared down stays as it is. Float32 or bfloat16 weights,
        bias-free only; returns whether it fused."""
        shared = self.shared_experts
        if self.fc1_latent_proj is None:
            owners = [(self.gate, "weight"), (shared.up_proj, "weight"), (shared.down_proj, "weight")]
            into = [self.gate.weight, shared.up_proj.weight]
            if not fusable([*into, shared.down_proj.weight], [shared.up_proj.bias, shared.down_proj.bias]):
                return False
            self._fused = FusedWeights(owners, stack_outputs(into), shared.down_proj.weight)
            return True
        owners = [
            (self.gate, "weight"), (self.fc1_latent_proj, "weight"), (shared.up_proj, "weight"),
            (shared.down_proj, "weight"), (self.fc2_latent_proj, "weight"),
        ]  # fmt: skip
        into, out_of = [m.weight for m, _ in owners[:3]], [m.weight for m, _ in owners[3:]]
        biases = [m.bias for m in (self.fc1_latent_proj, self.fc2_latent_proj, shared.up_proj)]
        if not fusable(into + out_of, biases + [shared.down_proj.bias]):
            return False
        self._fused = FusedWeights(owners, stack_outputs(into), stack_inputs(out_of))
        return True

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """forward through the fused matrices; None while autograd records or after a parameter was replaced."""
        if not self._fused.usable(x):
            return None
        w_in, w_out = self._fused.matrices
        g = self.gate
        E = g.weight.shape[0]
        L = self.fc1_latent_proj.weight.shape[0] if self.fc1_latent_proj is not None else 0
        logits, latent, h = linear(x, w_in).split([E, L, w_in.shape[0] - E - L], dim=-1)
        if not L:
            latent = x  # Nano: the routed experts read the hidden state itself
        few = x.shape[0] <= self.experts.native_max_tokens
        if g.n_group == 1 and not few and L:  # latent prefill: the weighted sums straight into w_out's input
            out = self._native_prefill(logits, latent, h, w_out)
            if out is not None:
                return out
        routed = None
        if g.n_group == 1 and few:  # decode: routing + experts, one native call
            routed = native.route_experts(
                logits, g.e_score_correction_bias, g.top_k, g.norm_topk_prob, g.routed_scaling_factor, latent,
                self.experts.up_proj, self.experts.down_proj,
            )  # fmt: skip
        elif g.n_group == 1:
            routed = self._native_routed(logits, latent)
        if routed is None:
            routed = self.experts(latent, *g.choose(logits))
        if L:
            return linear(torch.cat([relu2_(h), routed], dim=-1), w_out)  # h: columns of a fresh output, ours
        return linear(relu2_(h), w_out).add_(routed)

    def _native_routed(self, logits: torch.Tensor, x: torch.Tensor, into: torch.Tensor | None = None):
        """The routed experts for many tokens: native.moe_dispatch groups the tokens by expert, each expert runs
        two GEMMs over its block (MKL's), and native.moe_combine writes the weighted sums [T, L] into `into` (a
        new tensor if None), which it returns; None where the kernels cannot run."""
        g = self.gate
        grouped = native.moe_dispatch(logits, g.e_score_correction_bias, g.top_k, g.norm_topk_prob,
                                      g.routed_scaling_factor, x)  # fmt: skip
        if grouped is None:
            return None
        xs, counts, where, weights = grouped
        ys = self.experts.grouped(xs, counts)
        into = torch.empty(x.shape[0], x.shape[1], dtype=torch.float32) if into is None else into
        native.moe_combine(ys, where, weights, into)
        return into

    def _native_prefill(self, logits: torch.Tensor, latent: torch.Tensor, h: torch.Tensor, w_out: torch.Tensor):
        """Latent MoE for many tokens: [relu²(h) | routed] built in one buffer (no cat), then w_out."""
        S = h.shape[1]
        both = torch.empty(h.shape[0], S + latent.shape[1], dtype=torch.float32)
        if self._native_routed(logits, latent, both[:, S:]) is None:
            return None
        if not native.relu2_into(h, both[:, :S]):
            relu2_(both[:, :S].copy_(h))
        return linear(both, w_out)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [b, t, H] → [b, t, H]
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        if self._fused is not None:
            out = self._fused_forward(x)
            if out is not None:
                return out.view(shape)
        weights, indices = self.gate(x)
        latent = apply(self.fc1_latent_proj, x) if self.fc1_latent_proj is not None else x
        routed = self.experts(latent, weights, indices).to(hidden.dtype)
        if self.fc2_latent_proj is not None:
            routed = apply(self.fc2_latent_proj, routed)
        return (routed + self.shared_experts(x)).view(shape)
