"""A decode step as one native call: the CPU counterpart of a captured CUDA graph.

The runner's per-op decode path costs ~1 ms of Python and dispatch a step (nemo50: ~280 torch ops and ~30
ctypes calls around 8 layers), a sixth of the whole step. `DecodeProgram` lays the step out once, as the
runner would run it, as a flat list of kernel calls (nemotron3/kernels/cpu_program.c) over fixed addresses:
the weights (the runner's fused, K-major storage), the cache pools, and activation rows it owns. A step then
fills five small int64 arrays (token ids, state slots, K/V write rows, block-table addresses, key counts) and
makes one call. The kernels are the per-op path's own, so the two agree to float32 rounding (the final norm
is the native RMSNorm instead of torch's).

Only pure-decode steps of at most `max_rows` sequences run here; prefill chunks, mixed steps and larger
batches keep the per-op path, as does anything the program cannot lay out (`Unsupported`: a quantized or
hooked Linear, grouped routing, biased MoE projections, weights not in the runner's storage). LatentMoE
(Super, Ultra) and Nano's MoE without latent projections both run in it. A
parameter that gets new storage or a hook added after the layout is noticed before each step (`current`),
and the runner lays the program out again. `EngineConfig.enforce_eager` (vLLM's name) turns it off.
"""

from __future__ import annotations

import struct

import torch
from torch import nn

from nemotron3.config import ATTENTION, MAMBA, MOE
from nemotron3.config import MLP as MLP_KIND
from nemotron3.engine.cache import HybridCache
from nemotron3.kernels import native
from nemotron3.model.attention import Attention
from nemotron3.model.mlp import MLP
from nemotron3.model.moe import Experts, MoE, Router
from nemotron3.model.nemotron import NemotronHForCausalLM
from nemotron3.model.norm import RMSNorm

OP_WIDTH = 32  # int64 slots per op (cpu_program.c)
EMBED, NORM, LINEAR, RELU2, MAMBA_STEP, KV_WRITE, ATTEND, ROUTE_EXPERTS, ADD = range(1, 10)
IDS, SLOTS, POSITIONS, TABLES, LENGTHS = range(5)  # rows of the per-step argument array


class Unsupported(Exception):
    """The model holds something the program cannot lay out; the runner's per-op path runs it instead."""


def _bits(value: float) -> int:
    """A float as the int64 bits of a double, the program's encoding of real arguments."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


class DecodeProgram:
    """One model's decode step over one HybridCache, for 1 … max_rows sequences (see the module docstring)."""

    def __init__(self, model: NemotronHForCausalLM, cache: HybridCache, max_rows: int = native.LINEAR_MAX_ROWS):
        """Lay the step out; raises Unsupported (nothing kept) where the model or library does not allow it."""
        self._lib = native.library()
        if self._lib is None:
            raise Unsupported("the native kernels are not available")
        if model.dtype != torch.float32 or model.device.type != "cpu":
            raise Unsupported(f"activations must be float32 on the CPU (model: {model.dtype} on {model.device})")
        self.cache, self.max_rows = cache, max_rows
        self.vocab_size = model.config.vocab_size
        self._owners: list[tuple[dict, str, int]] = []  # (module's parameter/buffer dict, name, storage address)
        self._hookable: list[nn.Module] = []  # modules the per-op path calls, so their hooks would run there
        self._keep: list[torch.Tensor] = []  # tensors whose addresses the ops hold
        self.args = torch.zeros(5, max_rows, dtype=torch.int64)  # IDS … LENGTHS, filled per step
        self._args = self.args.numpy()
        self._alloc_rows(model)
        ops = self._layout(model)
        self.ops = torch.tensor([op + [0] * (OP_WIDTH - len(op)) for op in ops], dtype=torch.int64)
        self.n_ops = len(ops)
        if self._hooked():
            raise Unsupported("a module of the step has hooks, which only the per-op path runs")

    # ------------------------------------------------------------------ per step
    def current(self) -> bool:
        """Whether every captured parameter still has the storage laid out and no hook was added since."""
        return all(d[name].data_ptr() == ptr for d, name, ptr in self._owners) and not self._hooked()

    def _hooked(self) -> bool:
        return any(m._forward_hooks or m._forward_pre_hooks for m in self._hookable)

    def run(self, segments: list) -> torch.Tensor:
        """One decode token for each of `segments` (engine/runner.py Segments, decode only, ≤ max_rows, the cache
        grown for the new token); returns their logits [n, V] float32. Does not advance seq.num_tokens."""
        n = len(segments)
        a, bs = self._args, self.cache.block_size
        for r, s in enumerate(segments):
            seq = s.seq
            p = seq.num_tokens
            a[IDS, r] = s.tokens[0]
            a[SLOTS, r] = seq.slot
            if self.cache.has_attention:
                a[POSITIONS, r] = seq.blocks[p // bs] * bs + p % bs
                a[TABLES, r] = seq.table(p // bs + 1).data_ptr()
                a[LENGTHS, r] = p + 1
        logits = torch.empty(n, self.vocab_size, dtype=torch.float32)
        rc = self._lib.nm3_run_program(self.ops.data_ptr(), self.n_ops, n, logits.data_ptr(), torch.get_num_threads())
        if rc == -1:
            ids = [s.tokens[0] for s in segments]
            raise ValueError(f"token id out of range [0, {self.vocab_size}): {ids}")
        if rc != 0:
            raise MemoryError(f"nm3_run_program: a kernel's scratch allocation failed (code {rc})")
        return logits

    # ------------------------------------------------------------------ layout
    def _alloc_rows(self, model: NemotronHForCausalLM) -> None:
        """The activation rows every layer reuses (they stay in cache from layer to layer): the residual stream,
        the normed input, the mixer's output, its widest projection, its middle width, Mamba's conv scratch and
        the router's choices."""
        c = model.config
        H, R = c.hidden_size, self.max_rows
        wide, mid, conv, top_k = 1, 1, 1, 1
        for block in model.backbone.layers:
            m = block.mixer
            if isinstance(m, MoE) and m._fused is not None:
                wide, mid = max(wide, m._fused.matrices[0].shape[0]), max(mid, m._fused.matrices[1].shape[1])
                top_k = max(top_k, m.gate.top_k)
            elif isinstance(m, Attention):
                wide = max(wide, (m.num_heads + 2 * m.num_kv_heads) * m.head_dim)
                mid = max(mid, m.num_heads * m.head_dim)
            elif isinstance(m, MLP):
                wide = max(wide, m.up_proj.out_features)
            elif block.kind == MAMBA:
                wide, mid, conv = max(wide, m.in_proj.out_features), max(mid, m.inner), max(conv, m.conv_dim)
        self.hidden, self.x, self.delta, self.routed = (self._rows(H) for _ in range(4))
        self.wide, self.mid, self.conv_scratch = self._rows(wide), self._rows(mid), self._rows(conv)
        self.expert_ids = self._keep_tensor(torch.zeros(R, top_k, dtype=torch.int64))
        self.expert_weights = self._rows(top_k)

    def _rows(self, width: int) -> torch.Tensor:
        return self._keep_tensor(torch.zeros(self.max_rows, width, dtype=torch.float32))

    def _keep_tensor(self, t: torch.Tensor) -> torch.Tensor:
        self._keep.append(t)
        return t

    def _own(self, module: nn.Module, name: str) -> torch.Tensor:
        """module's parameter or buffer `name`, recorded so that `current` notices it being replaced."""
        store = module._parameters if name in module._parameters else module._buffers
        t = store[name]
        if t is not None:
            self._owners.append((store, name, t.data_ptr()))
        return t

    def _layout(self, model: NemotronHForCausalLM) -> list[list[int]]:
        backbone, c = model.backbone, model.config
        layers, H = backbone.layers, c.hidden_size
        emb = backbone.embeddings
        table = self._own(emb, "weight")
        if type(emb) is not nn.Embedding or not (table.dtype == torch.float32 and table.is_contiguous()):
            raise Unsupported("the embedding table is not a plain contiguous float32 nn.Embedding")
        self._hookable.append(emb)
        ops = [[EMBED, table.data_ptr(), H, self._arg(IDS), self.hidden.data_ptr(), c.vocab_size]]
        ops.append(self._norm(layers[0].norm, with_delta=False))
        for i, block in enumerate(layers):
            kind = c.layers_block_type[i]
            if kind == MAMBA:
                ops += self._mamba(i, block.mixer)
            elif kind == ATTENTION:
                ops += self._attention(i, block.mixer)
            elif kind == MOE:
                ops += self._moe(block.mixer)
            elif kind == MLP_KIND:
                ops += self._mlp(block.mixer)
            else:
                raise Unsupported(f"layer kind {kind!r}")
            ops.append(self._norm(layers[i + 1].norm if i + 1 < len(layers) else backbone.norm_f, with_delta=True))
        ops.append(self._linear(model.lm_head, self.x, None))
        return ops

    def _arg(self, row: int) -> int:
        return self.args[row].data_ptr()

    def _norm(self, norm: nn.Module, with_delta: bool) -> list[int]:
        """hidden (+= delta) → RMSNorm → x."""
        w = self._own(norm, "weight")
        if type(norm) is not RMSNorm or not (w.dtype == torch.float32 and w.is_contiguous()):
            raise Unsupported("a block norm is not a float32 RMSNorm")
        self._hookable.append(norm)
        delta = self.delta.data_ptr() if with_delta else 0
        return [NORM, self.hidden.data_ptr(), delta, w.data_ptr(), _bits(norm.eps), w.numel(), self.x.data_ptr()]

    def _matrix(self, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor | None,
                y_col: int = 0, ldx: int | None = None) -> list[int]:  # fmt: skip
        """y[:, y_col : y_col+N] = x[:, :K] · weightᵀ (+ bias); weight [N, K] as the runner stores it (a K-major
        view, float32 or bfloat16); x rows ldx floats apart (default: the buffer's width, else the width of the
        kernel that wrote them). y None: the step's logits."""
        ldx = ldx or x.shape[1]
        flag = native._WEIGHT_FLAG.get(weight.dtype)
        N, K = weight.shape
        if flag is None or weight.stride(0) != 1 or weight.stride(1) < N:
            raise Unsupported("a matrix is not in the runner's K-major float32/bfloat16 storage")
        if bias is not None and not (bias.dtype == torch.float32 and bias.is_contiguous()):
            raise Unsupported("a bias is not contiguous float32")
        if K > ldx or ldx > x.shape[1] or (y is not None and y_col + N > y.shape[1]):
            raise AssertionError(f"a [{N}, {K}] matrix does not fit its activation rows")  # a layout bug
        y_ptr, ldy = (0, N) if y is None else (y.data_ptr() + 4 * y_col, y.shape[1])
        b_ptr = 0 if bias is None else bias.data_ptr()
        return [LINEAR, x.data_ptr(), ldx, weight.data_ptr(), flag, K, N, weight.stride(1), b_ptr, y_ptr, ldy,
                native.LINEAR_KSPLIT_BYTES]  # fmt: skip

    def _linear(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor | None, y_col: int = 0,
                ldx: int | None = None) -> list[int]:  # fmt: skip
        """A plain nn.Linear (quantized or hooked ones run as themselves in the per-op path: Unsupported)."""
        if type(module) is not nn.Linear:
            raise Unsupported(f"{type(module).__name__} is not a plain nn.Linear")
        self._hookable.append(module)
        return self._matrix(self._own(module, "weight"), self._own(module, "bias"), x, y, y_col, ldx)

    def _mamba(self, layer: int, mixer) -> list[list[int]]:
        static = native._mamba_static(mixer)
        j = self.cache.mamba_index[layer]
        conv, ssm = self.cache.conv[j], self.cache.ssm[j]
        if static is None or not native._usable(conv, ssm) or not (conv.is_contiguous() and ssm.is_contiguous()):
            raise Unsupported("a Mamba layer's parameters or state pools are not contiguous float32")
        for module, name in ((mixer.conv1d, "weight"), (mixer.conv1d, "bias"), (mixer, "dt_bias"), (mixer, "A_log"),
                             (mixer, "D"), (mixer.norm, "weight")):  # fmt: skip
            self._own(module, name)
        conv_w, conv_b, dt_bias, a_log, d_skip, norm_w, C, K, nh, P, N, G, norm_groups = static
        lo, hi = mixer.decode_dt_range()
        width = mixer.in_proj.out_features
        step = [MAMBA_STEP, self._arg(SLOTS), self.wide.data_ptr(), self.wide.shape[1], mixer.inner, C,
                conv.data_ptr(), ssm.data_ptr(), conv_w, conv_b or 0, dt_bias, a_log, d_skip, norm_w, K, nh, P, N,
                G, norm_groups, _bits(lo), _bits(hi), _bits(mixer.norm.eps), self.conv_scratch.data_ptr(),
                self.mid.data_ptr()]  # fmt: skip
        if width != mixer.inner + C + nh:
            raise Unsupported("unexpected in_proj width")
        return [
            self._linear(mixer.in_proj, self.x, self.wide),
            step,
            self._linear(mixer.out_proj, self.mid, self.delta, ldx=mixer.inner),  # the step writes [n, I]
        ]

    def _attention(self, layer: int, attn: Attention) -> list[list[int]]:
        if type(attn) is not Attention:
            raise Unsupported(f"{type(attn).__name__} is not the Attention mixer")
        j = self.cache.attn_index[layer]
        k_plane, v_plane = self.cache.k[j], self.cache.v[j]
        kv_flag = native._weight_type(k_plane, v_plane)
        if kv_flag is None or not (k_plane.is_contiguous() and v_plane.is_contiguous()):
            raise Unsupported("the K/V pool is not contiguous float32 or bfloat16")
        nq, nkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        ops = []
        if attn._fused is not None and attn._fused._current() == attn._fused._ptrs:
            for m in (attn.q_proj, attn.k_proj, attn.v_proj):
                self._own(m, "weight")
            ops.append(self._matrix(attn._fused.matrices[0], None, self.x, self.wide))
        else:  # separate q, k, v (biases, say) into the same columns
            for m, col in ((attn.q_proj, 0), (attn.k_proj, nq * d), (attn.v_proj, (nq + nkv) * d)):
                ops.append(self._linear(m, self.x, self.wide, y_col=col))
        ld = self.wide.shape[1]
        kv_src = self.wide.data_ptr() + 4 * nq * d
        ops.append([KV_WRITE, kv_src, ld, self._arg(POSITIONS), k_plane.data_ptr(), v_plane.data_ptr(), kv_flag,
                    k_plane.shape[1], nkv, d])  # fmt: skip
        ops.append([ATTEND, self.wide.data_ptr(), ld, k_plane.data_ptr(), v_plane.data_ptr(), kv_flag,
                    k_plane.shape[1], self._arg(TABLES), self._arg(LENGTHS), self.cache.block_size, nq, nkv, d,
                    _bits(d**-0.5), self.mid.data_ptr()])  # fmt: skip
        ops.append(self._linear(attn.o_proj, self.mid, self.delta, ldx=nq * d))  # attention writes [n, nq, d]
        return ops

    def _moe(self, moe: MoE) -> list[list[int]]:
        """MoE through the runner's fused matrices. LatentMoE: [router | latent | shared up] = x·W_inᵀ; routed
        experts on the latent, relu² of the shared up; [relu²(h) | routed]·W_outᵀ is shared down + latent up.
        Nano (no latent): [router | shared up] = x·W_inᵀ; routed experts on x; shared down of relu²(h), plus
        the routed sum."""
        g, experts = moe.gate, moe.experts
        fused = moe._fused
        if type(moe) is not MoE or fused is None or fused._current() != fused._ptrs:
            raise Unsupported("a MoE layer is not fused (biases)")
        if type(g) is not Router or type(experts) is not Experts or g.n_group != 1:
            raise Unsupported("grouped routing or a replaced router/experts module")
        self._hookable.append(moe)
        for module, name in fused.owners:
            self._own(module, name)
        bias = self._own(g, "e_score_correction_bias")
        up, down = self._own(experts, "up_proj"), self._own(experts, "down_proj")
        w_flag = native._weight_type(up, down)
        if w_flag is None or not (up.is_contiguous() and down.is_contiguous() and bias.is_contiguous()):
            raise Unsupported("the routed experts are not contiguous float32/bfloat16")
        w_in, w_out = fused.matrices
        E = g.weight.shape[0]
        L = moe.fc1_latent_proj.weight.shape[0] if moe.fc1_latent_proj is not None else 0
        S = w_in.shape[0] - E - L
        n_experts, F_, width = up.shape
        wide, mid = self.wide.data_ptr(), self.mid.data_ptr()
        ld, ldm = self.wide.shape[1], self.mid.shape[1]
        if L:  # routed sums go to mid's columns S … S+L, after relu²(h)
            x_ptr, ldx, dest, ldd = wide + 4 * E, ld, mid + 4 * S, ldm
        else:  # routed sums on their own rows, added after shared down
            x_ptr, ldx, dest, ldd = self.x.data_ptr(), self.x.shape[1], self.routed.data_ptr(), self.routed.shape[1]
        ops = [
            self._matrix(w_in, None, self.x, self.wide),
            [RELU2, wide + 4 * (E + L), ld, S, mid, ldm],
            [ROUTE_EXPERTS, wide, ld, bias.data_ptr(), g.top_k, int(g.norm_topk_prob), _bits(g.routed_scaling_factor),
             self.expert_ids.data_ptr(), self.expert_weights.data_ptr(), x_ptr, ldx, width, up.data_ptr(),
             down.data_ptr(), w_flag, n_experts, F_, dest, ldd],  # fmt: skip
            self._matrix(w_out, None, self.mid, self.delta),
        ]
        if not L:
            ops.append([ADD, self.delta.data_ptr(), self.delta.shape[1], dest, ldd, self.delta.shape[1]])
        return ops

    def _mlp(self, mlp: MLP) -> list[list[int]]:
        if type(mlp) is not MLP:
            raise Unsupported(f"{type(mlp).__name__} is not the MLP mixer")
        self._hookable.append(mlp)
        F_ = mlp.up_proj.out_features
        return [
            self._linear(mlp.up_proj, self.x, self.wide),
            [RELU2, self.wide.data_ptr(), self.wide.shape[1], F_, self.wide.data_ptr(), self.wide.shape[1]],
            self._linear(mlp.down_proj, self.wide, self.delta),
        ]
