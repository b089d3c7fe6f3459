"""One forward step over a ragged batch, reading and writing the hybrid cache's pools.

All tokens of the step are packed into one stream [1, T, H]: token-wise layers (norms, MoE, MLP,
projections, lm_head) run once over the stream. Sequence-mixing layers split it: decode rows (one new
token each) advance their Mamba states together in one recurrence step; each prefill chunk runs the
chunked scan from its own state; attention runs per sequence over that sequence's own keys. No sequence
is padded to another's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemotron3.config import ATTENTION, MAMBA
from nemotron3.engine.cache import HybridCache, SeqCache
from nemotron3.engine.decode_program import DecodeProgram, Unsupported
from nemotron3.engine.host_memory import keep_freed_memory
from nemotron3.kernels import native
from nemotron3.model.attention import Attention, causal_attention
from nemotron3.model.fused import apply, fast_path, fast_path_precision
from nemotron3.model.mamba2 import MambaState
from nemotron3.model.moe import Experts, MoE, Router
from nemotron3.model.nemotron import NemotronHForCausalLM
from nemotron3.model.norm import RMSNorm


@dataclass
class Segment:
    """Tokens of one sequence fed in this step."""

    seq: SeqCache
    tokens: list[int]
    decode: bool  # a generated token (recurrence step) rather than a prompt chunk (scan)
    want_logits: bool  # sample after this segment (last prompt chunk, or a decode step)
    all_logits: bool = False  # logits at every position: a prompt chunk that scores (prompt_logprobs), a verify row
    # (m, slot) pairs, m increasing: copy the Mamba states after the chunk's first m tokens into state slot `slot`
    # (prefix caching)
    snapshots: tuple[tuple[int, int], ...] = ()


def logit_rows(segments: list[Segment]) -> list[int]:
    """The stream rows whose logits a step returns, increasing: every row of a segment with all_logits, else the
    last row of one with want_logits."""
    rows, end = [], 0
    for s in segments:
        start, end = end, end + len(s.tokens)
        if s.all_logits:
            rows.extend(range(start, end))
        elif s.want_logits:
            rows.append(end - 1)
    return rows


def transpose_linear_storage(model: torch.nn.Module) -> None:
    """Store every Linear weight [N, K] as a transposed view of a contiguous [K, N] tensor.

    F.linear then multiplies by a contiguous K×N matrix, which MKL streams much faster for the
    one-row GEMVs of decode: lm_head 32000×512 fp32 runs at 21 GB/s instead of 7.7 GB/s here
    (docs/benchmarks.md); prefill GEMMs are unaffected. Values and shapes are unchanged.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.is_contiguous() and module.weight.dim() == 2:
            module.weight.data = module.weight.data.t().contiguous().t()
        elif isinstance(module, Experts) and not native.available():
            # stacked [E, out, in]: each expert's matrix transposed likewise (the fused kernel reads rows instead)
            for p in (module.up_proj, module.down_proj):
                if p.is_contiguous():
                    p.data = p.data.transpose(1, 2).contiguous().transpose(1, 2)


WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def narrow_weight_storage(model: NemotronHForCausalLM, dtype: torch.dtype) -> int:
    """Weight-only storage: every plain Linear weight (lm_head included), every router and the routed experts'
    matrices are held in `dtype` (bfloat16), which the kernels widen to float32 as they stream it. Activations,
    K/V, Mamba states, norms, convolutions and biases keep the model's float32, so the result is exactly the
    float32 model on bf16-rounded matrices, while a decode step reads about half the bytes (lm_head is always
    its own tensor, never the embedding's). Returns how many parameters were narrowed; a model that is not
    float32 is a ValueError, raised before anything changes."""
    if model.dtype != torch.float32:
        raise ValueError(
            f"weight_dtype {dtype} narrows a float32 model's matrices; this model is {model.dtype} "
            "(load it with dtype='float32')"
        )
    params = []
    for module in model.modules():
        if type(module) is torch.nn.Linear or isinstance(module, Router):
            params.append(module.weight)
        elif type(module) is Experts:
            params += [module.up_proj, module.down_proj]
    with torch.no_grad():
        for p in params:
            p.data = p.data.to(dtype)  # strides kept: a K-major view stays K-major
    return len(params)


def add_norm(
    hidden: torch.Tensor, delta: torch.Tensor | None, norm: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + delta, norm(hidden + delta)), delta None meaning no add: the residual add and the next block's
    norm as one native call that updates hidden in place, for a plain RMSNorm (a hooked one runs as itself)."""
    if type(norm) is RMSNorm and not norm._forward_hooks and not norm._forward_pre_hooks:
        x = native.add_rms_norm(hidden, delta, norm.weight, norm.eps)
        if x is not None:
            return hidden, x
    if delta is not None:
        hidden = hidden + delta
    return hidden, norm(hidden)


class ModelRunner:
    """Runs NemotronHForCausalLM over packed ragged batches with a HybridCache."""

    def __init__(
        self, model: NemotronHForCausalLM, cache: HybridCache, compile: bool = False, enforce_eager: bool = False,
        matmul_precision: str = "highest",
    ) -> None:  # fmt: skip
        self.model = model
        self.cache = cache
        self.matmul_precision = matmul_precision  # model/fused.py: fast_path
        self.kinds = model.config.layers_block_type
        # the last block that holds a cache; the blocks after it need only the rows that sample (run_layers)
        self.last_cached_layer = max((i for i, k in enumerate(self.kinds) if k in (MAMBA, ATTENTION)), default=-1)
        if model.device.type == "cpu":
            keep_freed_memory()  # prefill temporaries stay in the heap for reuse (engine/host_memory.py)
            transpose_linear_storage(model)
            for module in model.modules():
                if isinstance(module, (MoE, Attention)):
                    module.fuse_projections()  # model/fused.py: one GEMV for matrices sharing an input
        # The decode recurrence is ~30 tiny element-wise ops per Mamba layer; inductor fuses them
        # (nemo50: 3 layers 744 -> 328 us per step). Compiled once per layer, dynamic in the batch size.
        self.compile = compile
        # Pure-decode steps replay a DecodeProgram (one native call, engine/decode_program.py), laid out on the
        # first such step; enforce_eager, or compile (which asks for the torch Mamba step), keeps the per-op path.
        self.use_program = not (enforce_eager or compile)
        self._program: DecodeProgram | None = None
        self._tables: tuple | None = None  # this step's block tables for decode attention (_decode_attention)
        self._slots: torch.Tensor | None = None  # this step's decode rows' state slots (_mamba_decode)
        self.dt_ranges = {
            i: block.mixer.decode_dt_range() for i, block in enumerate(model.backbone.layers) if self.kinds[i] == MAMBA
        }
        self.mix_decode = {
            i: torch.compile(block.mixer.mix, dynamic=True) if compile else block.mixer.mix
            for i, block in enumerate(model.backbone.layers)
            if self.kinds[i] == MAMBA
        }

    @torch.inference_mode()
    def step(self, segments: list[Segment]) -> torch.Tensor:
        """Feed every segment (decode segments first, in slot order); return logits float32 [rows, V]: in segment
        order, every position of a segment with all_logits, else the last position of one with want_logits.

        The cache must already hold blocks for the new tokens (HybridCache.grow).
        """
        lengths = [len(s.tokens) for s in segments]
        n_dec = sum(1 for s in segments if s.decode)
        if any(s.decode for s in segments[n_dec:]) or any(n != 1 for n in lengths[:n_dec]):
            raise ValueError("decode segments (one token each) must come first")
        program = self.decode_program(n_dec) if n_dec == len(segments) else None
        if program is not None:
            logits = program.run(segments)
            for s in segments:
                s.seq.num_tokens += 1
            return logits
        rows = logit_rows(segments)
        hidden, _ = self.run_layers(segments, n_dec, self._mamba, rows)
        _, last = add_norm(hidden[0], None, self.model.backbone.norm_f)
        for s, n in zip(segments, lengths):
            s.seq.num_tokens += n
        with fast_path(self.matmul_precision):
            return apply(self.model.lm_head, last).float()

    def decode_program(self, rows: int) -> DecodeProgram | None:
        """The program for a pure-decode step of `rows` sequences, laid out again when a parameter got new
        storage or a hook since; None where the per-op path runs (eager, too many rows, Unsupported)."""
        program = self._program
        if not self.use_program or rows > native.LINEAR_MAX_ROWS:
            return None
        if program is None or not program.current():
            try:
                program = self._program = DecodeProgram(self.model, self.cache)
            except Unsupported:
                self._program = None
                self.use_program = False  # the model holds what the program cannot run: per-op from now on
                return None
        return program

    def run_layers(
        self, segments: list[Segment], n_dec: int, mamba, rows: list[int] | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Embeddings and every block over the packed stream of `segments`; returns the pre-norm_f hidden
        states [1, T, H] and the segment offsets. `mamba(layer, mixer, x, segments, offsets, n_dec)` runs
        the Mamba layers up to their out_proj (plain decode/prefill here; the speculative runner keeps
        per-position states).

        `rows` (increasing stream rows, e.g. the last token of each segment that samples) asks for those rows'
        hidden states only, [1, len(rows), H]. The blocks after the last one that holds a cache (Mamba or
        attention) then run on those rows alone: nothing later reads the other rows, so the result is the
        same. Nemotron-H patterns end in a Mamba layer and a MoE layer, so a prefill skips the last MoE layer
        and the last out_proj for all but one token (nemo50 @2048: ~9.6 of ~58 GFLOP), and a chunk that does
        not sample skips them altogether."""
        device = self.model.device
        self._tables = self._slots = None
        ids = torch.tensor([t for s in segments for t in s.tokens], dtype=torch.long, device=device)
        offsets = [0]
        for s in segments:
            offsets.append(offsets[-1] + len(s.tokens))
        write_idx = None
        if self.cache.has_attention:
            write_idx = torch.cat(
                [self.cache.token_positions(s.seq, s.seq.num_tokens, len(s.tokens)) for s in segments]
            ).to(device)
        with fast_path(self.matmul_precision):  # fused matrices and native kernels (model/fused.py)
            hidden = self._run_blocks(ids, segments, offsets, n_dec, mamba, write_idx, rows)
        if rows is not None and hidden.shape[1] != len(rows):  # rows asked for, not cut inside
            hidden = hidden[:, rows]
        return hidden, offsets

    def _run_blocks(
        self, ids, segments: list[Segment], offsets: list[int], n_dec: int, mamba, write_idx, rows: list[int] | None
    ) -> torch.Tensor:
        """The blocks over the stream; with `rows` fewer than the stream's tokens, the stream is cut to them
        after the last cache-holding block (`cut`; before the first block in a model without one)."""
        backbone = self.model.backbone
        layers = backbone.layers
        hidden, x = add_norm(backbone.embeddings(ids)[None], None, layers[0].norm)
        cut = self.last_cached_layer if rows is not None and len(rows) < ids.numel() else None
        if cut == -1:  # no block holds a cache: every block needs only the sampling rows
            hidden, x = hidden[:, rows], x[:, rows]
            if not rows:
                return hidden
        for i, block in enumerate(layers):
            if self.kinds[i] == MAMBA:
                if i == cut and mamba == self._mamba:  # the runner's own step forms the kept rows only
                    y = self._mamba(i, block.mixer, x, segments, offsets, n_dec, rows)
                else:
                    y = mamba(i, block.mixer, x, segments, offsets, n_dec)
                out = apply(block.mixer.out_proj, y.to(x.dtype))
            elif self.kinds[i] == ATTENTION:
                out = self._attention(i, block.mixer, x, segments, offsets, write_idx)
            else:
                out = block.mixer(x)
            if i == cut:  # from here on, the kept rows only (the runner's own Mamba step already formed just those)
                hidden = hidden[:, rows]
                out = out if out.shape[1] == len(rows) else out[:, rows]
                if not rows:  # nothing samples: the later blocks have nothing to do
                    return hidden
            if i + 1 == len(layers):
                hidden = hidden + out
                break
            hidden, x = add_norm(hidden, out, layers[i + 1].norm)
        return hidden

    def _mamba(
        self, layer: int, mixer, x: torch.Tensor, segments: list[Segment], offsets: list[int], n_dec: int,
        rows: list[int] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """The Mamba mixer up to its out_proj (which _run_blocks applies): [1, T, I].

        With `rows` (the cut layer of run_layers: the decode rows and the last row of each sampling chunk), only
        those rows come back, [1, len(rows), I]: each prompt chunk's scan forms its last output or none
        (native.mamba_prefill `outputs`), and in_proj's z columns, which only gate the outputs, are computed for
        those rows alone (40 % of nemo300's in_proj)."""
        j = self.cache.mamba_index[layer]
        conv, ssm = self.cache.conv[j], self.cache.ssm[j]
        if rows is not None:
            proj = self._in_proj_without_z(mixer, x, sorted({*rows, *range(n_dec)}))
        else:
            proj = apply(mixer.in_proj, x)  # [1, T, I + C + nh]
        z, xbc, dt = mixer.split_projection(proj)
        parts = []
        if n_dec:
            y = self._mamba_decode(layer, mixer, proj, z, xbc, dt, segments[:n_dec], conv, ssm)
            kept = [r for r in rows if r < n_dec] if rows is not None else None
            parts.append(y if kept is None or len(kept) == n_dec else y[:, kept])
        parts += self._prefill_chunks(mixer, proj, segments, offsets, n_dec, conv, ssm, rows is not None)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    @staticmethod
    def _in_proj_without_z(mixer, x: torch.Tensor, need: list[int]) -> torch.Tensor:
        """in_proj's output [1, T, I + C + nh] with its z columns computed only in the rows `need` (the others are
        left unset: z gates its own row's output only, and those rows' outputs are dropped). Where this does not
        apply (few rows, which the native GEMV serves, or an in_proj that is not a plain float32 nn.Linear under
        float32 matmuls), the whole projection."""
        lin, T, I = mixer.in_proj, x.shape[1], mixer.inner
        plain = type(lin) is torch.nn.Linear and not (lin._forward_hooks or lin._forward_pre_hooks)
        if (
            not plain or lin.bias is not None or lin.weight.dtype != x.dtype or x.dtype != torch.float32
            or T <= native.LINEAR_MAX_ROWS or fast_path_precision() != "highest"
        ):  # fmt: skip
            return apply(lin, x)
        w, flat = lin.weight, x[0]
        proj = torch.empty(T, w.shape[0], dtype=x.dtype)
        torch.mm(flat, w[I:].t(), out=proj[:, I:])  # x | B | C | dt for every row (MKL writes the column block)
        proj[need, :I] = torch.mm(flat[need], w[:I].t())
        return proj[None]

    def _mamba_decode(self, layer: int, mixer, proj, z, xbc, dt, decoding: list[Segment], conv, ssm) -> torch.Tensor:
        """One recurrence step for the first len(decoding) rows; returns [1, n, I].

        The fused native kernel (nemotron3/kernels) reads and advances the pool slots directly; where it
        cannot run (not float32, no compiler, torch.compile asked for) the torch step does the same math."""
        n = len(decoding)
        slots = [s.seq.slot for s in decoding]
        if not self.compile:
            if self._slots is None:  # once per step, shared by every Mamba layer
                self._slots = torch.tensor(slots)
            y = native.mamba_step(mixer, proj[0, :n], self._slots, conv, ssm, self.dt_ranges[layer])
            if y is not None:
                return y[None]
        first = slots[0]
        consecutive = slots == list(range(first, first + n))
        if consecutive:  # views: the step updates the pool in place
            state = MambaState(conv[first : first + n], ssm[first : first + n])
        else:
            idx = torch.tensor(slots, device=conv.device)
            state = MambaState(conv.index_select(0, idx), ssm.index_select(0, idx))
        y = self.mix_decode[layer](z[0, :n, None], xbc[0, :n, None], dt[0, :n, None], state, decode=True)  # [n, 1, I]
        if not consecutive:
            conv.index_copy_(0, idx, state.conv)
            ssm.index_copy_(0, idx, state.ssm)
        return y.view(1, n, -1)

    @staticmethod
    def _prefill_chunks(
        mixer, proj, segments: list[Segment], offsets: list[int], n_dec: int, conv, ssm, sampled_only: bool = False
    ) -> list[torch.Tensor]:  # fmt: skip
        """Each prompt chunk (segments n_dec …) runs the chunked scan from its own state slot, in place (_scan); a
        chunk with snapshots scans in parts and copies the state at each snapshot point into its slot.
        sampled_only: a chunk returns its last row if it samples, else no row (the torch ops form every row and
        drop the rest; z may be unset in those rows); a chunk with all_logits returns every row either way."""
        parts = []
        dt_range = mixer.prefill_dt_range()
        for k in range(n_dec, len(segments)):
            a, b, slot = offsets[k], offsets[k + 1], segments[k].seq.slot
            seg = segments[k]
            outputs = "all" if seg.all_logits or not sampled_only else "last" if seg.want_logits else "none"
            pieces, done = [], 0
            for m, dst in seg.snapshots:  # scan up to each snapshot point and save the state there
                inner = outputs if m == b - a else "all" if outputs == "all" else "none"
                pieces.append(_scan(mixer, proj[:, a + done : a + m], conv, ssm, slot, dt_range, inner))
                conv[dst], ssm[dst] = conv[slot], ssm[slot]
                done = m
            if done < b - a:
                pieces.append(_scan(mixer, proj[:, a + done : b], conv, ssm, slot, dt_range, outputs))
            parts.append((pieces[0] if len(pieces) == 1 else torch.cat(pieces))[None])
        return parts

    def _attention(self, layer: int, attn, x: torch.Tensor, segments: list[Segment], offsets: list[int], write_idx):
        j = self.cache.attn_index[layer]
        q, k, v = attn.qkv(x)  # q [1, nq, T, d]; k, v [1, nkv, T, d]
        self.cache.write(j, write_idx, k[0], v[0])
        outs, first = [], 0
        n_dec = 0  # leading one-token decode rows (speculative verify rows carry several tokens)
        while n_dec < len(segments) and segments[n_dec].decode and offsets[n_dec + 1] - offsets[n_dec] == 1:
            n_dec += 1
        if n_dec:
            out = self._decode_attention(j, q[0, :, :n_dec].transpose(0, 1), segments[:n_dec])
            if out is not None:
                outs.append(out.transpose(0, 1)[None])  # [1, nq, n_dec, d]
                first = n_dec
        for n in range(first, len(segments)):  # prompt chunks (and multi-token verify rows) over their keys
            s, a, b = segments[n], offsets[n], offsets[n + 1]
            keys, values = self.cache.kv_view(layer, s.seq, s.seq.num_tokens + (b - a))
            keys, values = keys.to(q.dtype), values.to(q.dtype)
            out = native.prefill_attention(q[:, :, a:b], keys, values) if b - a > 1 else None
            outs.append(out if out is not None else causal_attention(q[:, :, a:b], keys[None], values[None]))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return attn.output(out)

    def _decode_attention(self, plane: int, q: torch.Tensor, decoding: list[Segment]) -> torch.Tensor | None:
        """All decode rows' attention in one native call that reads K/V through the block tables (no gather).

        q: [n, nq, d]. Returns [n, nq, d], or None where the kernel cannot run (then each row runs alone).
        The block-table tensors are built once per step and shared by every attention layer."""
        if self._tables is None:
            tables, offsets, lengths = [], [0], []
            bs = self.cache.block_size
            for s in decoding:
                n_keys = s.seq.num_tokens + 1
                tables.append(s.seq.table(-(-n_keys // bs)))
                offsets.append(offsets[-1] + tables[-1].numel())
                lengths.append(n_keys)
            table = tables[0] if len(tables) == 1 else torch.cat(tables)
            self._tables = (table, torch.tensor(offsets[:-1]), torch.tensor(lengths))
        tables, offsets, lengths = self._tables
        k, v = self.cache.k[plane], self.cache.v[plane]
        return native.decode_attention(q, k, v, tables, offsets, lengths, self.cache.block_size)


def _scan(mixer, proj: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor, slot: int, dt_range, outputs: str):
    """The Mamba mixer over one prompt chunk's projection [1, n, ·] from state slot `slot`, advancing it in place:
    one native call (conv, scan and gated norm, kernels/cpu_decode.c), or the mixer's torch ops. Returns the
    outputs [rows, I]: every row ("all"), the last ("last") or none ("none")."""
    y = native.mamba_prefill(mixer, proj[0], conv[slot], ssm[slot], dt_range, outputs)
    if y is None:
        z, xbc, dt = mixer.split_projection(proj)
        y = mixer.mix(z, xbc, dt, MambaState(conv[slot : slot + 1], ssm[slot : slot + 1]), decode=False)[0]
        y = y[-1:] if outputs == "last" else y[:0] if outputs == "none" else y
    return y
