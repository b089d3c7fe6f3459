"""Native speculative decoding with the model's own MTP block: draft k tokens, verify them in one forward.

`LLM(model, speculative_config={"method": "mtp", "num_speculative_tokens": k})` builds a
`SpeculativeEngine`. Per step, for every decoding sequence whose last known token is x_{L−1}:

1. draft: the MTP block (research/architecture.md §10) maps (h_i, embed(x_{i+1})) to the prediction of
   x_{i+2}. Its first draft d1 comes from the target's final-norm hidden state h_{L−2} and x_{L−1}; draft
   j > 1 feeds the block's own previous output as h and embed(d_{j−1}) (one block, applied
   recursively). The MTP attention layer keeps its own paged K/V (extra planes of the HybridCache that
   share the sequence's block table: MTP position i lives where main position i does).
2. verify: ONE target forward over [x_{L−1}, d1 … dn] gives the target's distribution at all n+1
   positions. Temperature 0: accept while d_j equals the target's argmax, then emit the target's own
   token (correction or bonus). Temperature > 0: accept d_j with probability min(1, p(d_j)/q(d_j)); at
   the first rejection emit a sample of norm(max(0, p − q)); if all pass emit a sample of p_{n+1}
   (Leviathan et al. 2023, Chen et al. 2023), so tokens are distributed exactly as the target's.
3. rollback: Mamba layers advance over the verify tokens with the one-step recurrence (the decode path's
   math), keeping the conv window and SSM state after every position; the state after exactly the
   accepted tokens is written back to the sequence's slot ("select"). The alternative "recompute"
   (snapshot, verify, restore, re-run the accepted tokens) is kept for the measurement in
   docs/speculative.md. K/V of rejected positions lie past the sequence's length (they are overwritten
   by the next step) and blocks holding only rejected positions go back to the pool.
4. catch up: the MTP block runs over the newly accepted positions with the verify forward's hidden
   states (writing its committed K/V); its last output gives d1 for the next step.

Prompts (and recomputes after preemption) run the MTP block over every prompt position, chunk by
chunk, so its K/V is complete when decoding starts. Requests with repetition/presence/frequency
penalties decode without drafts (their target distribution would depend on the drafts themselves).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nemotron3.config import ATTENTION, MAMBA
from nemotron3.engine.cache import HybridCache, SeqCache
from nemotron3.engine.engine import EngineConfig, LLMEngine
from nemotron3.engine.outputs import RequestOutput, SpecDecodeMetrics
from nemotron3.engine.runner import ModelRunner, Segment, logit_rows
from nemotron3.engine.sampler import SamplingTensors, argmax_ids, draw, processed_logits, token_logprobs
from nemotron3.engine.scheduler import Sequence, Status
from nemotron3.io.tokenizer import Tokenizer
from nemotron3.model.attention import causal_attention
from nemotron3.model.fused import apply, fast_path
from nemotron3.model.nemotron import NemotronHForCausalLM

METHODS = {"mtp": "mtp", "nemotron_h_mtp": "mtp"}  # vLLM's deprecated name maps to "mtp" as there
ROLLBACKS = ("select", "recompute")


# ============================================================================================ config


@dataclass
class SpeculativeConfig:
    """method: "mtp" (alias "nemotron_h_mtp"); num_speculative_tokens k ≥ 1 drafts per step;
    rollback: how Mamba states return to the accepted prefix ("select" per-position states, or "recompute")."""

    method: str = "mtp"
    num_speculative_tokens: int = 1
    rollback: str = "select"

    @classmethod
    def from_dict(cls, config: dict | SpeculativeConfig) -> SpeculativeConfig:
        if isinstance(config, SpeculativeConfig):
            config.validate()
            return config
        if not isinstance(config, dict):
            raise ValueError(  # noqa: TRY004 — the API's contract: a bad speculative_config is a ValueError
                f"speculative_config must be a dict such as {{'method': 'mtp', 'num_speculative_tokens': 3}}, "
                f"got {type(config).__name__}"
            )
        known = {"method", "num_speculative_tokens", "rollback"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {unknown}; known: {sorted(known)}")
        if "num_speculative_tokens" not in config:
            raise ValueError("speculative_config: 'num_speculative_tokens' is required (an integer >= 1)")
        out = cls(**config)
        out.validate()
        return out

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"speculative_config: unknown method {self.method!r}; supported: 'mtp' (alias 'nemotron_h_mtp')"
            )
        self.method = METHODS[self.method]
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"speculative_config: num_speculative_tokens must be an integer >= 1, got {k!r}")  # noqa: TRY004
        if k < 1:
            raise ValueError(f"speculative_config: num_speculative_tokens must be >= 1, got {k}")
        if self.rollback not in ROLLBACKS:
            raise ValueError(f"speculative_config: rollback must be one of {ROLLBACKS}, got {self.rollback!r}")

    def check_model(self, model: NemotronHForCausalLM) -> None:
        """The model must carry an MTP block the drafter can run."""
        if model.mtp is None:
            raise ValueError(
                "speculative_config: method 'mtp' needs a model with MTP weights (num_nextn_predict_layers > 0 "
                "and mtp.* tensors in the checkpoint); this model has no MTP block"
            )
        if MAMBA in model.config.mtp_layers_block_type:
            raise ValueError("speculative_config: MTP blocks with Mamba layers are not supported (Super's is '*E')")


# ============================================================================================ kernels


def mamba_multi_step(
    mixer, z: torch.Tensor, xbc: torch.Tensor, dt: torch.Tensor, conv0: torch.Tensor, ssm0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """T one-step recurrences (the decode path's math) for b sequences, keeping the state after each step.

    z: [b, T, I]; xbc: [b, T, C]; dt: [b, T, nh]; conv0: [b, C, K−1]; ssm0: [b, nh, P, N] (not modified).
    Returns y [b, T, I] float32 (gated-normed, as Mamba2Mixer.mix), conv states [b, T, C, K−1] and SSM
    states [b, T, nh, P, N] float32: index t holds the state after token t.
    """
    b, T, _ = xbc.shape
    K = mixer.kernel
    weight = mixer.conv1d.weight.squeeze(1).to(xbc.dtype)  # [C, K]
    window = torch.cat([conv0.to(xbc.dtype), xbc.transpose(1, 2)], dim=-1)  # [b, C, K−1+T]
    out = (window.unfold(-1, K, 1) * weight[:, None, :]).sum(-1)  # [b, C, T]: the decode path's dot products
    if mixer.conv1d.bias is not None:
        out = out + mixer.conv1d.bias[:, None]
    convs = window.unfold(-1, K - 1, 1)[:, :, 1:].permute(0, 2, 1, 3)  # [b, T, C, K−1]
    xbc = F.silu(out.transpose(1, 2))
    gn = mixer.n_groups * mixer.state_size
    x, B, C = xbc.split([mixer.inner, gn, gn], dim=-1)
    h, p, g = mixer.num_heads, mixer.head_dim, mixer.n_groups
    A = -torch.exp(mixer.A_log.float())
    delta = mixer._step_size(dt, chunked=False)  # [b, T, h]: decode semantics for the Δ clamp
    decay = torch.exp(delta * A)[..., None, None]  # [b, T, h, 1, 1]
    hg = h // g  # heads per B/C group: broadcast over [g, hg] instead of repeating B and C per head
    xh = x.float().reshape(b, T, h, p)
    inc = (delta[..., None] * xh).view(b, T, g, hg, p, 1) * B.float().view(b, T, g, 1, 1, -1)
    inc = inc.view(b, T, h, p, -1)  # [b, T, h, P, N]: (Δ·x) ⊗ B, as ssm_step
    ssms = torch.empty_like(inc)
    state = ssm0.float()
    for t in range(T):
        state = torch.add(state * decay[:, t], inc[:, t], out=ssms[:, t])
    y = (ssms.view(b, T, g, hg, p, -1) @ C.float().view(b, T, g, 1, -1, 1)).view(b, T, h, p)  # S_t · C_t
    y = (y + xh * mixer.D.float()[:, None]).reshape(b, T, mixer.inner)
    return mixer.norm(y, z), convs, ssms


# ============================================================================================ runner


@dataclass
class MTPSegment:
    """MTP rows of one sequence: positions start … start+t−1, target/draft hidden [t, H], next tokens [t]."""

    seq: SeqCache
    start: int
    hidden: torch.Tensor
    tokens: list[int]


class SpecRunner(ModelRunner):
    """ModelRunner whose decode segments may carry drafts (verify), returning logits of every verify
    position and the final-norm hidden states of every token; also runs the MTP block over the paged cache."""

    def __init__(
        self, model: NemotronHForCausalLM, cache: HybridCache, rollback: str = "select",
        matmul_precision: str = "highest",
    ) -> None:  # fmt: skip
        super().__init__(model, cache, matmul_precision=matmul_precision)
        self.rollback = rollback
        self.mtp_layers = model.mtp.block(0)
        attn = [i for i, layer in enumerate(self.mtp_layers) if layer.kind == ATTENTION]
        self.mtp_plane = dict(zip(attn, cache.mtp_planes))
        self._saved: dict[int, tuple] = {}  # Mamba pool index → (slots, per-position conv, per-position ssm)
        self._snapshot: dict[int, tuple] = {}  # Mamba pool index → (slots, conv, ssm) before the verify

    @torch.inference_mode()
    def forward(self, segments: list[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
        """Verify segments (decode=True, 1 + drafts tokens) first, then prompt chunks.

        Returns logits [rows, V] float32 of runner.logit_rows — every position of a segment with all_logits (verify
        segments, prompt chunks that score), the last of another with want_logits — and final-norm hidden states
        [T, H] of every token.
        """
        n_dec = sum(1 for s in segments if s.decode)
        if any(s.decode for s in segments[n_dec:]):
            raise ValueError("verify (decode) segments must come first")
        self._saved, self._snapshot = {}, {}
        hidden, _ = self.run_layers(segments, n_dec, self._spec_mamba)
        backbone = self.model.backbone
        hidden = backbone.norm_f(hidden[0])
        rows = logit_rows(segments)
        for s in segments:
            s.seq.num_tokens += len(s.tokens)
        with fast_path(self.matmul_precision):
            return apply(self.model.lm_head, hidden[rows]).float(), hidden

    def _spec_mamba(self, layer: int, mixer, x: torch.Tensor, segments, offsets, n_dec: int) -> torch.Tensor:
        """The Mamba mixer up to its out_proj (run_layers applies it), per-position states kept for the verify."""
        j = self.cache.mamba_index[layer]
        conv, ssm = self.cache.conv[j], self.cache.ssm[j]
        proj = apply(mixer.in_proj, x)  # [1, T, I + C + nh]
        z, xbc, dt = mixer.split_projection(proj)
        parts = []
        if n_dec:
            lengths = [len(s.tokens) for s in segments[:n_dec]]
            T = max(lengths)
            if all(n == T for n in lengths):  # the usual case: every sequence verifies k drafts
                zb, xb, db = (v[0, : offsets[n_dec]].view(n_dec, T, -1) for v in (z, xbc, dt))
            else:  # rows as [n_dec, T]; short segments repeat their last row (causal: never read)
                idx = torch.tensor(
                    [[offsets[k] + min(t, n - 1) for t in range(T)] for k, n in enumerate(lengths)], device=x.device
                )
                zb, xb, db = z[0][idx], xbc[0][idx], dt[0][idx]
            slots = torch.tensor([s.seq.slot for s in segments[:n_dec]], device=conv.device)
            conv0, ssm0 = conv.index_select(0, slots), ssm.index_select(0, slots)
            y, convs, ssms = mamba_multi_step(mixer, zb, xb, db, conv0, ssm0)
            if self.rollback == "select":
                self._saved[j] = (slots, convs, ssms)
            else:  # recompute: advance the pool over every verify token, keep the entering state
                self._snapshot[j] = (slots, conv0, ssm0)
                last = torch.tensor(lengths, device=conv.device) - 1
                ar = torch.arange(n_dec, device=conv.device)
                conv.index_copy_(0, slots, convs[ar, last].to(conv.dtype))
                ssm.index_copy_(0, slots, ssms[ar, last].to(ssm.dtype))
            parts.append(
                y.reshape(1, n_dec * T, -1)
                if T == min(lengths)
                else torch.cat([y[k, :n] for k, n in enumerate(lengths)])[None]
            )
        parts += self._prefill_chunks(mixer, proj, segments, offsets, n_dec, conv, ssm)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    @torch.inference_mode()
    def commit(self, keep: list[int]) -> None:
        """ "select" rollback: write the Mamba state after the first keep[k] tokens of verify segment k."""
        last = ar = None
        for j, (slots, convs, ssms) in self._saved.items():
            if last is None:
                last = torch.tensor(keep, device=convs.device) - 1
                ar = torch.arange(len(keep), device=convs.device)
            self.cache.conv[j].index_copy_(0, slots, convs[ar, last].to(self.cache.conv.dtype))
            self.cache.ssm[j].index_copy_(0, slots, ssms[ar, last].to(self.cache.ssm.dtype))
        self._saved = {}

    @torch.inference_mode()
    def restore(self, rows: list[int]) -> None:
        """ "recompute" rollback: put back the states verify segments `rows` had before the verify."""
        for j, (slots, conv0, ssm0) in self._snapshot.items():
            r = torch.tensor(rows, device=conv0.device)
            self.cache.conv[j].index_copy_(0, slots[r], conv0[r])
            self.cache.ssm[j].index_copy_(0, slots[r], ssm0[r])

    @torch.inference_mode()
    def mtp(self, segs: list[MTPSegment]) -> torch.Tensor:
        """Run the MTP block over ragged rows, writing its K/V at their positions; returns outputs [T, H]
        after final_layernorm (the next draft step's hidden, and the lm_head input)."""
        device = self.model.device
        ids = torch.tensor([t for s in segs for t in s.tokens], dtype=torch.long, device=device)
        h = torch.cat([s.hidden for s in segs]) if len(segs) > 1 else segs[0].hidden
        offsets = [0]
        for s in segs:
            offsets.append(offsets[-1] + len(s.tokens))
        first = self.mtp_layers[0]
        emb = self.model.backbone.embeddings(ids)
        with fast_path(self.matmul_precision):
            u = apply(first.eh_proj, torch.cat([first.enorm(emb), first.hnorm(h.to(emb.dtype))], dim=-1))[None]
            return self._mtp_layers(u, segs, offsets)

    def _mtp_layers(self, u: torch.Tensor, segs: list[MTPSegment], offsets: list[int]) -> torch.Tensor:
        device, last = self.model.device, self.mtp_layers[-1]
        for n, layer in enumerate(self.mtp_layers):
            x = layer.norm(u)
            if layer.kind == ATTENTION:
                plane = self.mtp_plane[n]
                q, k, v = layer.mixer.qkv(x)
                write_idx = torch.cat([self.cache.token_positions(s.seq, s.start, len(s.tokens)) for s in segs])
                self.cache.write(plane, write_idx.to(device), k[0], v[0])
                outs = []
                for m, s in enumerate(segs):
                    keys, values = self.cache.plane_view(plane, s.seq, s.start + len(s.tokens))
                    keys, values = keys[None].to(q.dtype), values[None].to(q.dtype)
                    outs.append(causal_attention(q[:, :, offsets[m] : offsets[m + 1]], keys, values))
                out = layer.mixer.output(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))
            else:
                out = layer.mixer(x)
            u = u + out
        return last.final_layernorm(u[0])


# ============================================================================================ engine


@dataclass
class _SpecState:
    """A sequence's drafter progress: MTP K/V is committed for positions < mtp_pos (= target's num_tokens
    after each step); `draft` / `q` / `hidden` hold d1, its distribution and the MTP output that made it."""

    mtp_pos: int = 0
    draft: int | None = None
    q: torch.Tensor | None = None  # [V] draft distribution (sampling only)
    hidden: torch.Tensor | None = None  # [H]


class SpeculativeEngine(LLMEngine):
    """LLMEngine that decodes with MTP drafts and one verify forward per step (module docstring)."""

    fork_samples = False  # the MTP state of a sequence (_SpecState) is not in the cache a fork copies
    caches_prefixes = False  # the drafter's per-sequence state is not in the cache
    applies_logits_processors = False  # verification samples from the target's own distributions
    supports_beam_search = False  # its step drafts and verifies every sequence; beams need the plain step

    def __init__(
        self,
        model: NemotronHForCausalLM,
        tokenizer: Tokenizer | None = None,
        config: EngineConfig | None = None,
        speculative_config: SpeculativeConfig | dict | None = None,
    ) -> None:
        spec = SpeculativeConfig.from_dict(speculative_config or {"num_speculative_tokens": 1})
        spec.check_model(model)
        n_planes = sum(1 for kind in model.config.mtp_layers_block_type if kind == ATTENTION)
        super().__init__(model, tokenizer, config, mtp_attention_layers=n_planes)
        self.spec_config = spec
        self.k = spec.num_speculative_tokens
        self.runner = SpecRunner(model, self.cache, spec.rollback, self.config.matmul_precision)
        self._state: weakref.WeakKeyDictionary[Sequence, _SpecState] = weakref.WeakKeyDictionary()
        self.stats = SpecDecodeMetrics(drafted_per_position=[0] * self.k, accepted_per_position=[0] * self.k)
        self.draft_hook = None  # tests: callable(seq, drafts) -> drafts, to force accept/reject patterns

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _speculates(seq: Sequence) -> bool:
        """Penalties, logit edits and bad words are applied by the plain sampler: such sequences decode one token a
        step."""
        return not (seq.params.has_penalties or seq.params.edits_logits or seq.params.bad_words)

    def _state_of(self, seq: Sequence) -> _SpecState:
        st = self._state.get(seq)
        if st is None or st.mtp_pos > seq.num_computed:  # new, or recomputing after preemption
            st = self._state[seq] = _SpecState()
        return st

    def _wanted_drafts(self, seq: Sequence) -> int:
        st = self._state.get(seq)
        if st is None or st.draft is None or not seq.is_decode or st.mtp_pos != seq.num_computed:
            return 0
        left = self.max_model_len - len(seq.prompt_ids) - len(seq.output_ids)
        if seq.params.max_tokens is not None:
            left = min(left, seq.params.max_tokens - len(seq.output_ids))
        return max(0, min(self.k, left - 1))

    def _metrics(self, seq: Sequence) -> SpecDecodeMetrics:
        m = self.requests[seq.request_id].metrics
        if m.spec_decode is None:
            m.spec_decode = SpecDecodeMetrics(drafted_per_position=[0] * self.k, accepted_per_position=[0] * self.k)
        return m.spec_decode

    def _draft_probs(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[int], list[torch.Tensor | None]]:
        """Draw one draft per row of MTP logits [B, V]: argmax for greedy rows, else a sample of q
        (the request's temperature/top-k/top-p/min-p applied to the MTP logits)."""
        tensors = SamplingTensors.build([s.params for s in seqs], [s.generator for s in seqs], logits.device)
        if tensors.all_greedy:
            return argmax_ids(logits), [None] * len(seqs)
        q = processed_logits(logits, tensors).softmax(-1)
        tokens = torch.where(tensors.temperature == 0, logits.argmax(-1), draw(q, tensors.generators)).tolist()
        return tokens, [None if s.params.greedy else q[i] for i, s in enumerate(seqs)]

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        for seq in self.scheduler.running:
            seq.num_spec = self._wanted_drafts(seq) if self._speculates(seq) else 0
        sched = self.scheduler.schedule()
        for seq in sched.preempted:
            self._state.pop(seq, None)
        if not sched:
            if self.scheduler.has_work():
                raise RuntimeError("scheduler could not place any work: the cache is too small for one sequence")
            return []
        now = time.time()
        t0 = time.perf_counter()
        drafts = self._draft([s for s in sched.decodes if s.num_spec > 0])
        t1 = time.perf_counter()

        segments = [Segment(s.cache, [s.last_id, *drafts.get(s, ([], []))[0]], True, True, all_logits=True)
                    for s in sched.decodes]  # fmt: skip
        chunks, done_prefills = self._prefill_segments(sched.prefills, now)
        segments += chunks
        starts = {seq: seq.num_computed for seq in [*sched.decodes, *(s for s, _ in sched.prefills)]}
        offsets = [0]
        for seg in segments:
            offsets.append(offsets[-1] + len(seg.tokens))
        logits, hidden = self.runner.forward(segments)
        t2 = time.perf_counter()

        # accept / sample; keep[k] = verify tokens of decode k whose K/V and state stay
        changed: dict[str, object] = {}
        keep, row = [], 0
        for seq in sched.decodes:
            toks, qs = drafts.get(seq, ([], []))
            rows = logits[row : row + 1 + len(toks)]
            row += 1 + len(toks)
            if self._speculates(seq):
                keep.append(self._accept(seq, toks, qs, rows))
            else:
                self._sample_and_append([seq], rows)
                keep.append(1)
            changed[seq.request_id] = self.requests[seq.request_id]
        rest = logits[row:]
        if any(c.all_logits for c in chunks):
            rest = self._take_prompt_logprobs(sched.prefills, chunks, rest, 0)
        if done_prefills:
            self._sample_and_append(done_prefills, rest)
            for seq in done_prefills:
                changed[seq.request_id] = self.requests[seq.request_id]
        t_fix = time.perf_counter()
        self._rollback(sched.decodes, keep, starts)
        t3 = time.perf_counter()
        new_rows = [(s, offsets[k], keep[k]) for k, s in enumerate(sched.decodes)]
        new_rows += [(s, offsets[len(sched.decodes) + k], n) for k, (s, n) in enumerate(sched.prefills)]
        self._catch_up(new_rows, starts, hidden)
        t4 = time.perf_counter()

        verify_time, draft_time = (t2 - t1) + (t3 - t_fix), (t1 - t0) + (t4 - t3)
        self.stats.verify_time += verify_time
        self.stats.draft_time += draft_time
        seen = set()
        for seq in sched.decodes:
            if seq.request_id in self.requests and seq.request_id not in seen and self._speculates(seq):
                seen.add(seq.request_id)
                m = self._metrics(seq)
                m.verify_time += verify_time
                m.draft_time += draft_time
        return self._emit(changed)

    # ------------------------------------------------------------------ drafting
    def _draft(self, seqs: list[Sequence]) -> dict[Sequence, tuple[list[int], list]]:
        """Drafts 2 … num_spec of every sequence (d1 was made by the last catch-up), batched per depth."""
        out = {}
        for s in seqs:
            st = self._state[s]
            out[s] = ([st.draft], [st.q])
        hidden = {s: self._state[s].hidden for s in seqs}
        for j in range(2, max((s.num_spec for s in seqs), default=0) + 1):
            batch = [s for s in seqs if s.num_spec >= j]
            segs = [
                MTPSegment(s.cache, self._state[s].mtp_pos + j - 2, hidden[s][None], [out[s][0][-1]]) for s in batch
            ]
            h = self.runner.mtp(segs)
            with torch.inference_mode(), fast_path(self.runner.matmul_precision):
                lg = apply(self.model.lm_head, h).float()
            tokens, qs = self._draft_probs(batch, lg)
            for i, s in enumerate(batch):
                out[s][0].append(tokens[i])
                out[s][1].append(qs[i])
                hidden[s] = h[i]
        if self.draft_hook is not None:  # tests: replace drafts; a replaced draft has no q (one-hot)
            for s in seqs:
                old_toks, old_qs = out[s]
                toks = list(self.draft_hook(s, list(old_toks)))
                out[s] = (toks, [q if a == b else None for a, b, q in zip(old_toks, toks, old_qs)])
        return out

    # ------------------------------------------------------------------ verification
    def _accept(self, seq: Sequence, drafts: list[int], qs: list, rows: torch.Tensor) -> int:
        """Verify `drafts` against the target rows [n+1, V]; append the accepted tokens plus one bonus or
        correction token (stopping early at a stop condition). Returns the verify tokens to keep (m+1)."""
        p, n = seq.params, len(drafts)
        banned = list(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids))
        for i in range(n + 1):  # min_tokens: end-of-sequence tokens are not allowed yet
            if len(seq.output_ids) + i < p.min_tokens:
                rows[i, banned] = float("-inf")
        if p.greedy:
            target = rows.argmax(-1).tolist()
            m = 0
            while m < n and drafts[m] == target[m]:
                m += 1
            tokens = drafts[:m] + [target[m]]
        else:
            t = SamplingTensors.build([p] * (n + 1), [None] * (n + 1), rows.device)
            probs = processed_logits(rows, t).softmax(-1)
            gen = seq.generator
            u = torch.rand(n, generator=gen, device=rows.device) if n else None
            tokens = None
            for j in range(n):
                d = drafts[j]
                q = qs[j] if qs[j] is not None else F.one_hot(torch.tensor(d), probs.shape[-1]).to(probs)
                if u[j] * q[d] < probs[j, d]:  # accept with probability min(1, p(d) / q(d))
                    continue
                residual = (probs[j] - q).clamp(min=0)  # rejected: sample norm(max(0, p − q))
                residual = residual if float(residual.sum()) > 0 else probs[j]
                tokens = drafts[:j] + [int(draw((residual / residual.sum())[None], [gen])[0])]
                break
            if tokens is None:
                tokens = drafts + [int(draw(probs[n][None], [gen])[0])]
        m = len(tokens) - 1
        if n:
            self._count(seq, n, m)
        result = None
        if p.logprobs is not None:
            result = token_logprobs(rows[: m + 1], torch.tensor(tokens, device=rows.device), p.logprobs)
        for i, tok in enumerate(tokens):
            seq.output_ids.append(tok)
            if result is not None:
                self._record_logprobs(seq, i, tok, result)
            self._check_stop(seq, tok)
            if seq.status is Status.FINISHED:
                self.scheduler.finish(seq)
                break
        return m + 1

    def _count(self, seq: Sequence, n: int, m: int) -> None:
        for stats in (self.stats, self._metrics(seq)):
            stats.num_steps += 1
            stats.num_draft_tokens += n
            stats.num_accepted_tokens += m
            stats.num_emitted_tokens += m + 1
            for j in range(n):
                stats.drafted_per_position[j] += 1
                stats.accepted_per_position[j] += j < m

    # ------------------------------------------------------------------ state rollback
    def _rollback(self, decodes: list[Sequence], keep: list[int], starts: dict) -> None:
        """Bring every live verify sequence's cache to exactly its accepted tokens."""
        if self.runner.rollback == "select":
            self.runner.commit(keep)
        else:
            redo = [
                (k, s) for k, s in enumerate(decodes)
                if s.cache is not None and keep[k] < s.cache.num_tokens - starts[s]
            ]  # fmt: skip
            if redo:
                self.runner.restore([k for k, _ in redo])
                segs = []
                for k, s in redo:
                    s.cache.num_tokens = starts[s]
                    segs.append(Segment(s.cache, s.ids_slice(starts[s], starts[s] + keep[k]), True, False))
                self.runner.forward(segs)
        bs = self.cache.block_size
        for k, s in enumerate(decodes):
            if s.cache is None:
                continue
            s.cache.num_tokens = starts[s] + keep[k]
            need = -(-s.cache.num_tokens // bs) if self.cache.has_attention else 0
            if len(s.cache.blocks) > need:  # blocks that held only rejected positions go back to the pool
                self.cache.release_blocks(s.cache.truncate(need))

    # ------------------------------------------------------------------ drafter catch-up
    def _catch_up(self, new_rows: list[tuple[Sequence, int, int]], starts: dict, hidden: torch.Tensor) -> None:
        """Run the MTP block over this step's new target positions (accepted verify tokens, prompt chunks):
        new_rows holds (sequence, first row in `hidden`, rows). Sequences whose every known token but the
        newest is now cached also get d1 for the next step from their last MTP row."""
        segs, owners = [], []
        for s, a, n in new_rows:
            if s.status is not Status.RUNNING or s.cache is None or not self._speculates(s):
                continue
            st = self._state_of(s)
            start = starts[s]
            if st.mtp_pos != start:  # drafter out of step (should not happen): restart its state
                self._state.pop(s, None)
                continue
            segs.append(MTPSegment(s.cache, start, hidden[a : a + n], s.ids_slice(start + 1, start + n + 1)))
            owners.append(s)
            st.mtp_pos = start + n
            st.draft = st.q = st.hidden = None
        if not segs:
            return
        out = self.runner.mtp(segs)
        last, ready, r = [], [], 0
        for seg, s in zip(segs, owners):
            r += len(seg.tokens)
            if s.is_decode:  # everything known is in the cache but the newest token: draft what follows
                last.append(r - 1)
                ready.append(s)
        if not ready:
            return
        h = out[last]
        with torch.inference_mode(), fast_path(self.runner.matmul_precision):
            lg = apply(self.model.lm_head, h).float()
        tokens, qs = self._draft_probs(ready, lg)
        for i, s in enumerate(ready):
            st = self._state[s]
            st.draft, st.q, st.hidden = tokens[i], qs[i], h[i]
