"""Mamba-2 mixer: causal depthwise conv, chunked SSD scan for prefill, one-step recurrence for decode.

Math (research/architecture.md §5): per head h with state S ∈ ℝ^{P×N},
    S_t = exp(Δ_t·A_h) · S_{t−1} + (Δ_t·x_t) ⊗ B_t,        y_t = S_t·C_t + D_h·x_t
The SSM state is float32 always; the chunked scan computes the same recurrence with matrix products
inside chunks of `chunk_size` steps and a short recurrence across chunks (the SSD form of Mamba-2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.config import DT_CLAMP_TRANSFORMERS, ModelConfig
from nemotron3.kernels import native
from nemotron3.model.fused import fast_path_on
from nemotron3.model.norm import GatedRMSNorm


@dataclass
class MambaState:
    """Recurrent state of one Mamba layer for a batch: the last K−1 conv inputs and the SSM state."""

    conv: torch.Tensor  # [b, C, K-1], model dtype: pre-conv x|B|C columns
    ssm: torch.Tensor  # [b, nh, P, N], float32


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv over time, continuing from `conv_state` (zeros when None); no activation.

    x: [b, t, c]; weight: [c, k]; bias: [c] or None; conv_state: [b, c, k−1].
    Returns out [b, t, c] and the new state [b, c, k−1] (the last k−1 inputs).
    """
    b, t, c = x.shape
    k = weight.shape[-1]
    xt = x.transpose(1, 2)
    if conv_state is None:
        conv_state = xt.new_zeros(b, c, k - 1)
    window = torch.cat([conv_state.to(xt.dtype), xt], dim=-1)  # [b, c, k−1+t]
    if t == 1:  # decode: one dot product per channel; far cheaper than a conv1d launch (~200 µs on CPU)
        out = (window * weight.to(xt.dtype)).sum(-1, keepdim=True)
        out = out if bias is None else out + bias[:, None]
    else:
        out = F.conv1d(window, weight.unsqueeze(1).to(xt.dtype), bias, groups=c)  # [b, c, t]
    return out.transpose(1, 2), window[:, :, window.shape[-1] - (k - 1) :]


def segments_of(doc_ids: torch.Tensor) -> torch.Tensor:
    """Monotone segment index [b, t] (0, 0, 1, 1, 2 …): +1 wherever `doc_ids` changes along the sequence.

    Packed training marks each document with a doc id (padding −1); a segment is a run of equal ids, so the
    id values themselves never matter, only where they change.
    """
    change = torch.zeros_like(doc_ids, dtype=torch.long)
    change[:, 1:] = (doc_ids[:, 1:] != doc_ids[:, :-1]).long()
    return change.cumsum(1)


def segmented_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, segments: torch.Tensor
) -> torch.Tensor:
    """Causal depthwise conv that never reads across a segment start (packed documents), from a zero state.

    out[t] = bias + Σ_{s<k} w[:, k−1−s] · x[t−s] · [seg[t−s] = seg[t]]. x: [b, t, c]; weight: [c, k];
    segments: [b, t] monotone. Returns [b, t, c]. Equal to `causal_conv1d` run on each document alone.
    """
    t, k = x.shape[1], weight.shape[-1]
    w = weight.to(x.dtype)
    out = x * w[:, k - 1]
    for s in range(1, min(k, t)):
        same = (segments[:, s:] == segments[:, :-s]).unsqueeze(-1)  # [b, t−s, 1]
        tap = torch.where(same, x[:, :-s], 0.0) * w[:, k - 1 - s]
        out = out + F.pad(tap, (0, 0, s, 0))
    return out if bias is None else out + bias.to(x.dtype)


def _segsum_exp(a: torch.Tensor) -> torch.Tensor:
    """exp(Σ_{j<i≤l} a_i) for j ≤ l and 0 above the diagonal. a: [..., q] → [..., q(l), q(j)].

    a ≤ 0, so the kept differences are ≤ 0; clamping the others to 0 before exp (then zeroing them) keeps
    every exp input finite: exp over -inf entries runs ~2× slower on CPU (8.4M elements: 32 vs 14 ms).
    """
    q = a.shape[-1]
    cs = a.cumsum(-1)
    diff = cs[..., :, None] - cs[..., None, :]
    causal = torch.ones(q, q, dtype=torch.bool, device=a.device).tril()
    return torch.exp(diff.clamp_(max=0.0)).masked_fill(~causal, 0.0)


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    max_chunks: int = 16,
    segments: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan (prefill). Returns y without the D skip, and the final SSM state.

    x: [b, t, h, p]; dt: [b, t, h] (softplus'ed, clamped); A: [h] (< 0); B, C: [b, t, g, n] where head
    h reads group h // (h/g); initial_state: [b, h, p, n] or None. All math in float32.
    Returns y [b, t, h, p] fp32 and final_state [b, h, p, n] fp32.
    Long inputs are scanned `max_chunks` chunks at a time, carrying the state, so the intra-chunk
    decay tensor (b·h·chunks·Q² floats) stays bounded: 134 MB per sequence for Super at the default.
    segments: [b, t] monotone segment index (packed documents, see `segments_of`) or None. With it, the
    state is reset at every segment start, as if each document were scanned alone (mamba_ssm's seq_idx):
    every decay factor that spans a segment start is multiplied by 0.
    """
    step = chunk_size * max_chunks
    if x.shape[1] <= step:
        return _ssd_segment(x, dt, A, B, C, chunk_size, initial_state, segments)
    ys, state = [], initial_state
    for s in range(0, x.shape[1], step):
        seg = state_seg = None
        if segments is not None:
            seg = segments[:, s : s + step]
            state_seg = segments[:, s - 1] if s > 0 else None
        y, state = _ssd_segment(
            x[:, s : s + step], dt[:, s : s + step], A, B[:, s : s + step], C[:, s : s + step], chunk_size,
            state, seg, state_seg,
        )  # fmt: skip
        ys.append(y)
    return torch.cat(ys, dim=1), state


def _ssd_segment(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None,
    segments: torch.Tensor | None = None,
    state_segment: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ssd_chunk_scan on one stretch, all its chunks at once (shapes as ssd_chunk_scan).

    `state_segment` [b]: the segment the initial state belongs to (default: that of the first token).
    """
    b, t, h, p = x.shape
    g, n = B.shape[-2:]
    hg = h // g  # heads per B/C group
    q = chunk_size
    pad = (-t) % q
    x, dt, B, C = (v.float() for v in (x, dt, B, C))
    if pad:  # zero Δ ⇒ padded steps leave the state unchanged and produce outputs we crop
        x, B, C = (F.pad(v, (0, 0, 0, 0, 0, pad)) for v in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
        if segments is not None:
            segments = torch.cat([segments, segments[:, -1:].expand(b, pad)], dim=1)
    nc = (t + pad) // q
    # Group heads as [g, hg] so B/C never need to be expanded to every head.
    xdt = (x * dt[..., None]).view(b, nc, q, g, hg, p)  # Δ·x
    a = (dt * A.float()).view(b, nc, q, g, hg).permute(0, 1, 3, 4, 2)  # [b, nc, g, hg, q], Δ·A ≤ 0
    B = B.view(b, nc, q, g, n)
    C = C.view(b, nc, q, g, n)
    a_cum = a.cumsum(-1)  # [b, nc, g, hg, q]

    # 1. within each chunk: y_l = Σ_{j≤l} (C_l·B_j) exp(s_l − s_j) Δ_j x_j
    cb = torch.einsum("bclgn,bcsgn->bcgls", C, B)  # [b, nc, g, q, q]
    decay = _segsum_exp(a)  # [b, nc, g, hg, q, q]
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b, nc, g, hg, q]
    chunk_decay = torch.exp(a_cum[..., -1])  # [b, nc, g, hg]
    entering_decay = torch.exp(a_cum)  # [b, nc, g, hg, q]: from a chunk's entering state to step l
    if segments is not None:  # zero every decay that crosses a segment start (a new document)
        seg = segments.view(b, nc, q)
        first = seg[:, 0, 0] if state_segment is None else state_segment
        seg_in = torch.cat([first[:, None], seg[:, :-1, -1]], dim=1)  # [b, nc]: segment of the entering state
        decay = decay * (seg[..., :, None] == seg[..., None, :])[:, :, None, None]
        decay_to_end = decay_to_end * (seg == seg[..., -1:])[:, :, None, None]
        chunk_decay = chunk_decay * (seg[..., -1] == seg_in)[:, :, None, None]
        entering_decay = entering_decay * (seg == seg_in[..., None])[:, :, None, None]
    y = torch.einsum("bcgls,bcghls,bcsghp->bclghp", cb, decay, xdt)

    # 2. each chunk's own contribution to the state at its end
    chunk_states = torch.einsum("bcsgn,bcghs,bcsghp->bcghpn", B, decay_to_end, xdt)

    # 3. states entering each chunk: a short recurrence over chunks
    state = x.new_zeros(b, g, hg, p, n) if initial_state is None else initial_state.float().view(b, g, hg, p, n)
    entering = []
    for c in range(nc):
        entering.append(state)
        state = state * chunk_decay[:, c, :, :, None, None] + chunk_states[:, c]
    states_in = torch.stack(entering, dim=1)  # [b, nc, g, hg, p, n]

    # 4. contribution of the entering state: y_l += exp(s_l) · (C_l · S_in)
    y = y + torch.einsum("bclgn,bcghpn,bcghl->bclghp", C, states_in, entering_decay)
    y = y.reshape(b, nc * q, h, p)[:, :t]
    return y, state.reshape(b, h, p, n)


def ssm_step(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """One recurrence step (decode); updates `state` in place and returns y without the D skip.

    state: [b, h, p, n] fp32; x: [b, h, p]; dt: [b, h]; A: [h]; B, C: [b, g, n]. Returns y [b, h, p] fp32.
    """
    b, h, p, n = state.shape
    g = B.shape[1]
    dt = dt.float()
    decay = torch.exp(dt * A.float())  # [b, h]
    Bh = B.float().repeat_interleave(h // g, dim=1)  # [b, h, n]
    Ch = C.float().repeat_interleave(h // g, dim=1)
    state.mul_(decay[..., None, None]).add_((dt[..., None] * x.float())[..., None] * Bh[:, :, None, :])
    return torch.einsum("bhpn,bhn->bhp", state, Ch)


class Mamba2Mixer(nn.Module):
    """The `M` layer's mixer: in_proj → conv+SiLU → SSD → gated RMSNorm → out_proj."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.mamba_num_heads
        self.head_dim = config.mamba_head_dim
        self.n_groups = config.n_groups
        self.state_size = config.ssm_state_size
        self.chunk_size = config.chunk_size
        self.inner = config.mamba_inner_size
        self.conv_dim = config.mamba_conv_dim
        self.kernel = config.conv_kernel
        self.dt_clamp = config.dt_clamp
        self.time_step_min = config.time_step_min
        self.time_step_limit = config.time_step_limit
        H, nh = config.hidden_size, self.num_heads
        self.in_proj = nn.Linear(H, self.inner + self.conv_dim + nh, bias=config.use_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=config.use_conv_bias
        )
        # The small per-head tensors stay float32 in every model dtype: Δ and A feed exp() of the recurrence.
        self.dt_bias = nn.Parameter(torch.ones(nh))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, nh + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(nh))
        self.norm = GatedRMSNorm(self.inner, config.n_groups, config.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.inner, H, bias=config.use_bias)

    def new_state(
        self, batch_size: int, dtype: torch.dtype, device: torch.device, ssm_dtype=torch.float32
    ) -> MambaState:
        return MambaState(
            conv=torch.zeros(batch_size, self.conv_dim, self.kernel - 1, dtype=dtype, device=device),
            ssm=torch.zeros(batch_size, self.num_heads, self.head_dim, self.state_size, dtype=ssm_dtype, device=device),
        )

    def _step_size(self, dt: torch.Tensor, chunked: bool) -> torch.Tensor:
        """Δ = softplus(dt + dt_bias), clamped per `config.dt_clamp` (architecture.md §5.8)."""
        delta = F.softplus(dt.float() + self.dt_bias.float())
        if self.dt_clamp == DT_CLAMP_TRANSFORMERS:
            return delta.clamp(min=self.time_step_min) if chunked else delta
        lo, hi = self.time_step_limit
        if lo > 0.0 or hi < math.inf:
            delta = delta.clamp(min=lo, max=hi)
        return delta

    def decode_dt_range(self) -> tuple[float, float]:
        """(lo, hi) that the decode step clamps Δ to; (−inf, inf) where `_step_size` leaves it unclamped."""
        if self.dt_clamp == DT_CLAMP_TRANSFORMERS:
            return (-math.inf, math.inf)
        lo, hi = self.time_step_limit
        return (lo, hi) if lo > 0.0 or hi < math.inf else (-math.inf, math.inf)

    def prefill_dt_range(self) -> tuple[float, float]:
        """(lo, hi) that the chunked scan clamps Δ to (`_step_size(…, chunked=True)`), for the native prefill."""
        if self.dt_clamp == DT_CLAMP_TRANSFORMERS:
            return (self.time_step_min, math.inf)
        return self.decode_dt_range()

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """in_proj and its split: z [.., I] (gate), xbc [.., C] (conv input x|B|C), dt [.., nh]."""
        return self.split_projection(self.in_proj(hidden))

    def split_projection(self, proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """An in_proj output [.., I + C + nh] as views z, xbc, dt (the engine keeps `proj` for its kernel)."""
        return proj.split([self.inner, self.conv_dim, self.num_heads], dim=-1)

    def mix(
        self,
        z: torch.Tensor,
        xbc: torch.Tensor,
        dt: torch.Tensor,
        state: MambaState | None,
        decode: bool | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Everything between in_proj and out_proj for b sequences of t tokens each.

        z: [b, t, I]; xbc: [b, t, C]; dt: [b, t, nh]; state (if given) is read and advanced in place.
        `decode` (default: one token with a state) takes the recurrence step, else the chunked scan; the
        engine passes False for a one-token prompt chunk, since that is prefill for the Δ clamp (§5.8).
        `segments` [b, t] (packed training, no state): conv and scan restart at every segment start.
        Returns the gated-normed output [b, t, I] (float32; the caller casts for out_proj).
        """
        b, t, _ = xbc.shape
        if decode is None:
            decode = state is not None and t == 1
        if segments is not None:
            if state is not None:
                raise ValueError("packed documents (doc_ids) cannot be combined with a cache")
            xbc = segmented_conv1d(xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias, segments)
            new_conv = None
        else:
            xbc, new_conv = causal_conv1d(
                xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias, state.conv if state else None
            )
        xbc = F.silu(xbc)
        gn = self.n_groups * self.state_size
        x, B, C = xbc.split([self.inner, gn, gn], dim=-1)
        A = -torch.exp(self.A_log.float())
        if decode:  # one recurrence step
            delta = self._step_size(dt[:, 0], chunked=False)
            xh = x[:, 0].view(b, self.num_heads, self.head_dim)
            ssm = state.ssm if state.ssm.dtype == torch.float32 else state.ssm.float()
            y = ssm_step(ssm, xh, delta, A, B[:, 0].view(b, self.n_groups, -1), C[:, 0].view(b, self.n_groups, -1))
            if ssm is not state.ssm:
                state.ssm.copy_(ssm)
            y = y.unsqueeze(1)
        else:
            delta = self._step_size(dt, chunked=True)
            xh = x.reshape(b, t, self.num_heads, self.head_dim)
            B, C = B.reshape(b, t, self.n_groups, -1), C.reshape(b, t, self.n_groups, -1)
            y = None
            if state is not None and segments is None and fast_path_on():  # the engine's prefill: one native call
                y = native.ssd_scan(xh, delta, A, B, C, self.chunk_size, state.ssm)  # advances state.ssm in place
            if y is None:
                y, final = ssd_chunk_scan(
                    xh, delta, A, B, C, self.chunk_size, state.ssm if state is not None else None, segments=segments
                )
                if state is not None:
                    state.ssm.copy_(final)
        if state is not None:
            state.conv.copy_(new_conv)
        xf = x.reshape(b, t, self.num_heads, self.head_dim).float()
        y = (y + xf * self.D.float()[:, None]).reshape(b, t, self.inner)
        return self.norm(y, z)

    def forward(
        self,
        hidden: torch.Tensor,
        state: MambaState | None = None,
        decode: bool | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # hidden: [b, t, H] → [b, t, H]; `state` (if given) is read and advanced in place.
        z, xbc, dt = self.project(hidden)
        return self.out_proj(self.mix(z, xbc, dt, state, decode, segments).to(hidden.dtype))
