"""LLMEngine: requests in, one batched model step at a time, per-request outputs out.

`add_request` validates and queues; `step` schedules (continuous batching, chunked prefill,
preemption), runs the model once over the ragged batch, samples every sequence that needs a token,
applies stop conditions and returns the requests whose state changed. `LLM` and the server drive it.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field

import torch

from nemotron3.engine.beam_search import BeamGroup, BeamSearchParams, Hypothesis, select, step_logprobs
from nemotron3.engine.cache import CacheConfig, HybridCache
from nemotron3.engine.detokenizer import IncrementalDetokenizer
from nemotron3.engine.gc_heap import freeze_gc_heap
from nemotron3.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from nemotron3.engine.runner import WEIGHT_DTYPES, ModelRunner, Segment, narrow_weight_storage
from nemotron3.engine.sampler import (
    SampleResult,
    SamplingTensors,
    argmax_ids,
    bad_word_sequences,
    banned_by,
    logprob_entries,
    sample,
    token_logprobs,
)
from nemotron3.engine.sampling_params import SamplingParams
from nemotron3.engine.scheduler import Scheduler, SchedulerConfig, Sequence, Status
from nemotron3.io.tokenizer import Tokenizer
from nemotron3.model.nemotron import NemotronHForCausalLM

KV_CACHE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision's names


@dataclass
class EngineConfig:
    """Engine options (vLLM's names where they exist)."""

    max_model_len: int | None = None  # default: the model's max_position_embeddings, capped by the cache
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_chunked_prefill: bool = True
    block_size: int = 16
    kv_cache_memory_bytes: int = 2 << 30  # K/V blocks + Mamba state slots together
    compile: bool = False  # torch.compile the Mamba decode step (fuses its ~30 small ops; inductor on CPU)
    # vLLM's name: True keeps every step on the per-op path instead of replaying decode steps as one native
    # call (engine/decode_program.py, the CPU counterpart of CUDA graphs).
    enforce_eager: bool = False
    # "bfloat16": weight-only bf16 on a float32 model (engine/runner.py, narrow_weight_storage): matrices stored
    # in bf16 and widened in the kernels, everything else float32; decode reads half the bytes. None: as loaded.
    weight_dtype: str | None = None
    # K/V pool dtype (vLLM's name): "auto" = the model's; "bfloat16" halves the K/V memory and the bytes decode
    # attention reads (K and V are rounded as they are written; attention math stays float32).
    kv_cache_dtype: str = "auto"
    # torch.set_float32_matmul_precision's names, for the engine's prefill GEMMs (≥ 128 rows) on CPUs with AMX
    # (kernels/cpu_amx.c): "highest" float32 (the default); "high" three bfloat16 products per float32 product
    # (~1e-5 relative); "medium" one (bfloat16 inputs, ~3e-3). Without AMX, "medium" runs on AVX512-BF16 dot
    # products (≥ 64 rows) where the CPU has them, "high" stays float32. Decode steps: float32.
    matmul_precision: str = "highest"
    # vLLM's name: keep full K/V blocks, and Mamba states at a few block ends, after requests finish, so a prompt
    # that starts with cached tokens (a shared system prompt, the next turn of a chat, a resubmission, a recompute
    # after preemption) skips them (engine/prefix_cache.py). Off by default: snapshots cost state slots.
    enable_prefix_caching: bool = False
    prefix_cache_states: int | None = None  # Mamba state snapshots kept (default max_num_seqs; each one slot)


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    prompt_logprobs: list | None = None  # [None, entry for prompt token 1, ...] as far as computed
    bad_words: list[list[int]] = field(default_factory=list)  # token sequences of SamplingParams.bad_words
    parked: list[Sequence] = field(default_factory=list)  # samples 1 … n-1 until sample 0 has the prompt (_fork)
    beam: BeamGroup | None = None  # a beam-search request: `seqs` are its live beams


class LLMEngine:
    # n > 1: the request's first sample prefills the prompt and the others start from copies of its cache (_fork);
    # an engine that keeps more per-sequence state than the cache holds (speculative.py) prefills each sample.
    fork_samples = True
    # prefix caching resumes a sequence from cached blocks and a state snapshot; an engine with per-sequence state
    # beyond the cache (speculative.py) cannot
    caches_prefixes = True
    applies_logits_processors = True  # SamplingParams.logits_processors / structured_outputs (not speculative.py)
    supports_beam_search = True  # BeamSearchParams requests (not speculative.py: its step samples every sequence)

    def __init__(
        self,
        model: NemotronHForCausalLM,
        tokenizer: Tokenizer | None = None,
        config: EngineConfig | None = None,
        mtp_attention_layers: int = 0,  # K/V planes for the MTP drafter (engine/speculative.py)
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        mc = model.config
        narrow = self._check_dtypes(config, model)  # before anything changes the model
        if narrow is not None:
            narrow_weight_storage(model, narrow)
        if config.enable_prefix_caching and not self.caches_prefixes:
            raise ValueError(f"enable_prefix_caching is not supported by {type(self).__name__}")
        cache_config = CacheConfig(
            config.kv_cache_memory_bytes, config.block_size, config.max_num_seqs, config.enable_prefix_caching,
            config.prefix_cache_states,
        )  # fmt: skip
        self.cache = HybridCache(
            mc, cache_config, model.dtype, model.device, mtp_attention_layers, KV_CACHE_DTYPES[config.kv_cache_dtype]
        )
        capacity = self.cache.num_blocks * self.cache.block_size if self.cache.has_attention else 1 << 62
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        if capacity < self.max_model_len:
            if config.max_model_len is not None:
                raise ValueError(
                    f"max_model_len {config.max_model_len} needs {self.max_model_len} K/V tokens but the cache holds "
                    f"{capacity}: raise kv_cache_memory_bytes or lower max_model_len"
                )
            self.max_model_len = capacity
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs, config.enable_chunked_prefill),
            self.cache,
        )
        self.runner = ModelRunner(
            model, self.cache, compile=config.compile, enforce_eager=config.enforce_eager,
            matmul_precision=config.matmul_precision,
        )  # fmt: skip
        eos = mc.eos_token_id if isinstance(mc.eos_token_id, list) else [mc.eos_token_id]
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = {e for e in eos if e is not None}
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self._beam_requests: set[str] = set()  # unfinished beam-search requests (the step looks for beams only then)
        freeze_gc_heap()  # the objects alive now never become garbage: out of the collector's walks (gc_heap.py)

    # ------------------------------------------------------------------ requests
    def add_request(
        self, request_id: str, prompt: str | dict | list[int], params: SamplingParams | BeamSearchParams | None = None,
        fork_of: str | None = None,
    ) -> None:  # fmt: skip
        """Validate and queue a request. Prompts: text, a list of token ids, or {"prompt_token_ids": [...]}.
        BeamSearchParams make it a beam search (engine/beam_search.py): its output, once finished, holds the
        beam_width best sequences, best first.

        fork_of: the id of a request with the same prompt (a server's n samples arrive as n requests): while that
        request's first sample has not finished the prompt, this one waits and then starts from a copy of its
        cache instead of prefilling (_fork). Otherwise, or for another prompt, the request is queued as usual."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = self._prompt_ids(prompt)
        if isinstance(params, BeamSearchParams):
            self._add_beam_request(request_id, text, ids, params)
            return
        ids = params.truncated(ids, self.max_model_len)
        self._check_token_ids(params)
        if params.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop: stop strings need a tokenizer; use stop_token_ids instead")
        self._check_length(ids)
        req = _Request(request_id, text, ids, params, [], RequestMetrics(arrival_time=time.time()))
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        if params.bad_words:
            if self.tokenizer is None:
                raise ValueError("SamplingParams.bad_words: bad words need a tokenizer; use logit_bias with token ids")
            req.bad_words = bad_word_sequences(self.tokenizer, params.bad_words)
        constrain = self._structured_outputs(params)
        source = self._fork_source(fork_of, ids) if params.prompt_logprobs is None else None  # scoring prefills
        for index in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.model.device).manual_seed(params.seed + index)
            seq_params = params if constrain is None else constrain()
            seq = Sequence(next(self._seq_ids), request_id, index, ids, seq_params, next(self._arrivals), gen)
            req.seqs.append(seq)
            if source is not None:
                source.parked.append(seq)
            elif index and self.fork_samples:
                req.parked.append(seq)
            else:
                self.scheduler.add(seq)
        self.requests[request_id] = req

    def _check_length(self, ids: list[int]) -> None:
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, leaving no room to generate"
            )

    def _add_beam_request(self, request_id: str, text: str | None, ids: list[int], params: BeamSearchParams) -> None:
        """Queue a beam search: one sequence for the prompt; its beams fork from it (_beam_select). Refused where
        its beam_width beams at full length could never be in the cache together (they step together)."""
        if not self.supports_beam_search:
            raise ValueError(f"beam search is not supported by {type(self).__name__}")
        self._check_length(ids)
        k = params.beam_width
        if k > self.config.max_num_seqs:
            raise ValueError(
                f"BeamSearchParams.beam_width {k} is more than max_num_seqs {self.config.max_num_seqs}: every beam "
                "is a running sequence"
            )
        max_new = min(params.max_tokens, self.max_model_len - len(ids))
        need = k * self.cache.blocks_needed(None, len(ids) + max_new)
        if need > self.cache.num_blocks:
            raise ValueError(
                f"BeamSearchParams: {k} beams of {len(ids) + max_new} tokens need {need} K/V blocks but the cache holds "
                f"{self.cache.num_blocks}: lower beam_width or max_tokens, or raise kv_cache_memory_bytes"
            )
        group = BeamGroup(params, max_new)
        sp = SamplingParams(temperature=params.temperature, max_tokens=max_new, ignore_eos=params.ignore_eos)
        seq = Sequence(next(self._seq_ids), request_id, 0, ids, sp, next(self._arrivals), beam=group)
        self.requests[request_id] = _Request(request_id, text, ids, sp, [seq], RequestMetrics(time.time()), beam=group)
        self._beam_requests.add(request_id)
        self.scheduler.add(seq)

    def _structured_outputs(self, params: SamplingParams):
        """For SamplingParams.structured_outputs: a function giving each sample its own params, with a fresh
        constraint (engine/structured.py) appended to its logits processors; None without structured outputs."""
        spec = params.structured_outputs
        if spec is None:
            return None
        if not self.applies_logits_processors:
            raise ValueError(f"SamplingParams.structured_outputs is not supported by {type(self).__name__}")
        if self.tokenizer is None:
            raise ValueError("SamplingParams.structured_outputs needs a tokenizer (constraints are on text)")
        from nemotron3.engine.structured import processor_factory

        make = processor_factory(spec, self.tokenizer, self.model.config.vocab_size, self.eos_ids)

        def constrained() -> SamplingParams:
            return dataclasses.replace(params, n=1, structured_outputs=None,
                                       logits_processors=[*params.logits_processors, make()])  # fmt: skip

        return constrained

    def _fork_source(self, fork_of: str | None, ids: list[int]) -> _Request | None:
        """The request whose first sample a new request with prompt `ids` can fork from, if any (add_request)."""
        source = self.requests.get(fork_of) if fork_of is not None and self.fork_samples else None
        if source is None or source.prompt_ids != ids:
            return None
        first = source.seqs[0]
        started = first.output_ids or first.status is Status.FINISHED  # past its prompt: nothing left to share
        return None if started else source

    def _check_token_ids(self, params: SamplingParams) -> None:
        """logit_bias and allowed_token_ids name tokens of this model's vocabulary."""
        vocab = self.model.config.vocab_size
        named = (("logit_bias", params.logit_bias or ()), ("allowed_token_ids", params.allowed_token_ids or ()))
        for name, ids in named:
            bad = sorted(t for t in ids if t >= vocab)
            if bad:
                raise ValueError(f"SamplingParams.{name}: token ids {bad[:5]} are outside the vocabulary [0, {vocab})")

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompt given but the model has no tokenizer: pass prompt_token_ids")
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            text, ids = None, list(prompt)
        else:
            raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids: {bad[:5]} are not token ids in [0, {vocab})")
        return text, ids

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request: its cache returns to the pools at once. Unknown or finished ids are ignored."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self._beam_requests.discard(request_id)
        for seq in req.seqs:
            if seq.status is not Status.FINISHED:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        for seq in req.parked:  # other requests' samples that waited to fork from this one: they prefill instead
            if seq.request_id != request_id and seq.status is not Status.FINISHED:
                self.scheduler.add(seq)
        req.parked = []
        return self._output(req)

    @staticmethod
    def _check_dtypes(config: EngineConfig, model: NemotronHForCausalLM) -> torch.dtype | None:
        """Validate kv_cache_dtype, matmul_precision and weight_dtype's name; return the dtype to narrow the
        matrices to, if any (narrow_weight_storage then refuses a model that is not float32, before changing it)."""
        if config.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, got {config.kv_cache_dtype!r}")
        if config.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(
                f"matmul_precision must be one of {list(MATMUL_PRECISIONS)}, got {config.matmul_precision!r}"
            )
        if config.weight_dtype is None:
            return None
        if config.weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype must be one of {sorted(WEIGHT_DTYPES)} or None, got {config.weight_dtype!r}")
        target = WEIGHT_DTYPES[config.weight_dtype]
        return None if target == model.dtype else target

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def reset_prefix_cache(self) -> bool:
        """Drop the cached blocks and states no running request holds (vLLM's name); True if none is left."""
        return self.cache.reset_prefix_cache()

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """One model forward over the scheduled batch; returns outputs of requests that advanced."""
        sched = self.scheduler.schedule()
        if not sched:
            if self.scheduler.has_work():
                raise RuntimeError("scheduler could not place any work: the cache is too small for one sequence")
            return []
        now = time.time()
        segments, sampled = [], []
        for seq in sched.decodes:
            segments.append(Segment(seq.cache, [seq.last_id], decode=True, want_logits=True))
            sampled.append(seq)
        chunks, finished = self._prefill_segments(sched.prefills, now)
        segments += chunks
        sampled += finished
        logits = self.runner.step(segments)
        if self.cache.prefix is not None:
            self._cache_prefixes(sched, chunks)
        if any(c.all_logits for c in chunks):
            logits = self._take_prompt_logprobs(sched.prefills, chunks, logits, len(sched.decodes))
        if finished:
            logits = self._fork(sampled, logits)
        changed: dict[str, _Request] = {}
        if sampled and self._beam_requests:
            sampled, logits = self._beam_step(sampled, logits, changed)
        if sampled:
            self._sample_and_append(sampled, logits)
            for seq in sampled:
                changed[seq.request_id] = self.requests[seq.request_id]
        return self._emit(changed)

    def _emit(self, changed: dict) -> list[RequestOutput]:
        """RequestOutputs of the requests that changed this step; finished ones are stamped and dropped."""
        outputs = []
        for req in changed.values():
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = time.time()
            out = self._output(req)
            if out.finished:
                req.metrics.finished_time = time.time()
                del self.requests[req.request_id]
            outputs.append(out)
        return outputs

    def _prefill_segments(self, prefills, now: float) -> tuple[list[Segment], list[Sequence]]:
        """Segments of this step's prompt chunks, and the sequences whose prompt they finish (those want
        logits); stamps each request's first scheduled time."""
        segments, finished = [], []
        for seq, n in prefills:
            start = seq.num_computed
            done = start + n == len(seq.prompt_ids) + len(seq.output_ids)
            req = self.requests[seq.request_id]
            segments.append(Segment(seq.cache, seq.ids_slice(start, start + n), decode=False, want_logits=done,
                                    all_logits=self._scores_prompt(req, seq, start, n),
                                    snapshots=self._prompt_snapshots(seq, start, n)))  # fmt: skip
            if done:
                finished.append(seq)
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
        return segments, finished

    def _prompt_snapshots(self, seq: Sequence, start: int, n: int) -> tuple[tuple[int, int], ...]:
        """With prefix caching, the Mamba states the chunk of positions [start, start + n) saves (Segment.snapshots):
        at the end of the prompt's last full block before its last token (a later prompt that repeats or extends
        this one resumes there), and at the sequence's branch point (where it left the cached blocks of an earlier
        prompt: the next prompt sharing that prefix resumes there). Each takes a snapshot slot."""
        if self.cache.prefix is None or not self.cache.free_snapshots.capacity:
            return ()
        end = (len(seq.prompt_ids) - 1) // self.cache.block_size * self.cache.block_size
        snapshots = []
        for point in sorted({seq.branch_point, end}):
            slot = self.cache.take_snapshot_slot() if start < point <= start + n else None
            if slot is not None:
                snapshots.append((point - start, slot))
        return tuple(snapshots)

    def _cache_prefixes(self, sched, chunks: list[Segment]) -> None:
        """After a step: cache every stepped sequence's newly full blocks, keep the snapshots its chunk took, and
        snapshot a sequence past its prompt that just reached a block end (HybridCache.save_state: the next turn of
        a chat, or a recompute, resumes there)."""
        cache, bs = self.cache, self.cache.block_size
        stepped = [(seq, 1, ()) for seq in sched.decodes]
        stepped += [(seq, n, chunk.snapshots) for (seq, n), chunk in zip(sched.prefills, chunks)]
        for seq, n, snapshots in stepped:
            c = seq.cache
            if c.num_tokens // bs == len(c.nodes):  # no new full block (most decode steps)
                continue
            cache.commit(c, seq.ids_slice)
            for m, slot in snapshots:
                cache.keep_snapshot(c, (c.num_tokens - n + m) // bs, slot)
            if c.num_tokens % bs == 0 and c.num_tokens >= len(seq.prompt_ids) and cache.free_snapshots.capacity:
                cache.save_state(c)  # the state is at that block's end

    def _fork(self, sampled: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """Start the parked samples of every request whose first sample just finished its prompt: each gets a copy of
        that sample's cache (HybridCache.fork) and joins this step's sampling with the same logits row (its own seed
        draws its own token). A forked sample's own parked samples (a request that forked from a forked one) fork in
        turn. Samples that find no room prefill the prompt themselves, queued as usual. Extends `sampled` in place;
        returns the logits with the forked samples' rows appended."""
        source = list(range(len(sampled)))  # the logits row each sampled sequence reads
        k = 0
        while k < len(sampled):
            seq, k = sampled[k], k + 1
            req = self.requests[seq.request_id]
            if not req.parked or seq.output_ids:
                continue
            for child in req.parked:
                if child.status is Status.FINISHED:  # its own request was aborted while it waited
                    continue
                room = len(self.scheduler.running) < self.config.max_num_seqs and self.cache.can_fork(seq.cache)
                if not room:
                    self.scheduler.add(child)
                    continue
                child.cache = self.cache.fork(seq.cache)
                child.status = Status.RUNNING
                self.scheduler.running.append(child)
                sampled.append(child)
                source.append(source[k - 1])
            req.parked = []
        return logits[source] if len(source) > logits.shape[0] else logits

    # ------------------------------------------------------------------ beam search (engine/beam_search.py)
    def _beam_step(self, sampled: list[Sequence], logits: torch.Tensor, changed: dict) -> tuple[list, torch.Tensor]:
        """Give the beams among this step's sampled sequences their candidates, step each group whose live beams
        all have them (finished requests join `changed`); return the other sequences and their logits rows."""
        rows = [i for i, s in enumerate(sampled) if s.beam is not None]
        if not rows:
            return sampled, logits
        beams = [sampled[i] for i in rows]
        counts = [s.beam.num_candidates(self.eos_ids) for s in beams]
        values, ids = step_logprobs(logits[rows], [s.beam.params.temperature for s in beams], max(counts))
        for s, n, v, t in zip(beams, counts, values, ids):
            s.candidates = (v[:n], t[:n])
        for rid in dict.fromkeys(s.request_id for s in beams):
            req = self.requests[rid]
            if all(s.candidates is not None for s in req.seqs):
                self._beam_select(req)
                if not req.seqs:
                    changed[rid] = req
        keep = [i for i, s in enumerate(sampled) if s.beam is None]
        return [sampled[i] for i in keep], logits[keep]

    def _beam_select(self, req: _Request) -> None:
        """One step of a beam group: select the next beams (beam_search.select), close the beams no child kept,
        extend the kept ones (a second child of a beam forks its cache), retire beams at their length limit, and
        stop early once no live beam can reach the best beam_width finished hypotheses."""
        group, live = req.beam, req.seqs
        if group.num_cached_tokens is None:
            group.num_cached_tokens = live[0].num_cached_tokens or 0
        kids: list[list] = [[] for _ in live]
        for child in select(group, live, self.eos_ids):
            kids[child.parent].append(child)
        for s, mine in zip(live, kids):
            s.candidates = None
            if not mine:
                self.scheduler.finish(s)  # first, so that its slot and blocks can take the forks
        extended = []
        for s, mine in zip(live, kids):
            for seq, child in zip([s] + [self._beam_fork(s) for _ in mine[1:]], mine):
                seq.output_ids.append(child.token)
                seq.cumulative_logprob = child.cum_logprob
                seq.logprobs.append(child.entry)
                extended.append(seq)
        req.seqs = []
        for seq in extended:
            if len(seq.output_ids) >= group.max_new:
                group.finished.append(Hypothesis(seq.output_ids, seq.cumulative_logprob, seq.logprobs, "length"))
                self.scheduler.finish(seq)
            else:
                req.seqs.append(seq)
        if req.seqs and len(group.finished) >= group.width:
            bar = group.score(group.ranked(group.finished)[group.width - 1])
            if all(group.best_possible(s.cumulative_logprob, len(s.output_ids)) < bar for s in req.seqs):
                for s in req.seqs:
                    self.scheduler.finish(s)
                req.seqs = []
        if not req.seqs:
            self._beam_requests.discard(req.request_id)

    def _beam_fork(self, parent: Sequence) -> Sequence:
        """A new beam continuing `parent`: a copy of its cache where a slot and blocks are free, else queued to
        recompute its tokens."""
        child = Sequence(next(self._seq_ids), parent.request_id, parent.index, parent.prompt_ids, parent.params,
                         parent.arrival, output_ids=list(parent.output_ids), beam=parent.beam,
                         cumulative_logprob=parent.cumulative_logprob, logprobs=list(parent.logprobs))  # fmt: skip
        room = len(self.scheduler.running) < self.config.max_num_seqs
        if parent.cache is not None and room and self.cache.can_fork(parent.cache):
            child.cache = self.cache.fork(parent.cache)
            child.status = Status.RUNNING
            self.scheduler.running.append(child)
        else:
            self.scheduler.requeue(child)
        return child

    def _beam_output(self, req: _Request) -> RequestOutput:
        """The finished hypotheses and the live beams (an aborted request's), best beam_width first."""
        group = req.beam
        hyps = group.ranked(group.finished + [
            Hypothesis(s.output_ids, s.cumulative_logprob, s.logprobs, s.finish_reason or "abort") for s in req.seqs
        ])  # fmt: skip
        outs = []
        for i, h in enumerate(hyps[: group.width]):
            text = self.tokenizer.decode(h.output_ids) if self.tokenizer else ""
            outs.append(CompletionOutput(i, text, list(h.output_ids), h.cum_logprob, list(h.logprobs), h.finish_reason,
                                         h.stop_reason))  # fmt: skip
        finished = all(s.status is Status.FINISHED for s in req.seqs)
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, finished, req.metrics,
                             num_cached_tokens=group.num_cached_tokens or 0)  # fmt: skip

    @staticmethod
    def _scores_prompt(req: _Request, seq: Sequence, start: int, n: int) -> bool:
        """Whether the chunk of positions [start, start + n) yields prompt logprobs not yet recorded (its row p scores
        prompt token p + 1): the request's first sample computes them (its other samples prefill the same prompt),
        and a recompute after preemption does not compute them again."""
        done, end = req.prompt_logprobs, len(req.prompt_ids)
        return done is not None and seq.index == 0 and len(done) < end and start < end - 1 and start + n >= len(done)

    def _take_prompt_logprobs(self, prefills, chunks: list[Segment], logits: torch.Tensor, first: int) -> torch.Tensor:
        """Record the prompt logprobs of the chunks that asked for every position's logits (runner.logit_rows
        order: `first` decode rows, then per chunk all its rows or its last); return the rows that sample."""
        keep, row = list(range(first)), first
        for (seq, n), chunk in zip(prefills, chunks):
            if chunk.all_logits:
                self._record_prompt_logprobs(seq, seq.num_computed - n, logits[row : row + n])
                row += n
                if chunk.want_logits:
                    keep.append(row - 1)
            elif chunk.want_logits:
                keep.append(row)
                row += 1
        return logits[keep]

    def _record_prompt_logprobs(self, seq: Sequence, start: int, logits: torch.Tensor) -> None:
        """Logprobs of the prompt tokens that the chunk's logits [n, V] (positions start …) predict: the logits at
        position p score prompt token p + 1. Positions already recorded (a recompute) are skipped."""
        req = self.requests[seq.request_id]
        done, prompt = req.prompt_logprobs, req.prompt_ids
        a, b = len(done) - 1 - start, min(logits.shape[0], len(prompt) - 1 - start)
        if b <= a:
            return
        targets = torch.tensor(prompt[start + a + 1 : start + b + 1], device=logits.device)
        k = req.params.prompt_logprobs
        done.extend(logprob_entries(token_logprobs(logits[a:b], targets, k), k))

    def _sample_and_append(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        params = [s.params for s in seqs]
        if all(_plain_greedy(s) for s in seqs):  # argmax only: no sampling tensors to build
            self._append(seqs, argmax_ids(logits), None)
            return
        tensors = SamplingTensors.build(params, [s.generator for s in seqs], logits.device)
        bans = [(row, banned_by(self.requests[s.request_id].bad_words, s.output_ids)) for row, s in enumerate(seqs)
                if s.params.bad_words]  # fmt: skip
        tensors.banned = [(row, ids) for row, ids in bans if ids] or None
        for row, s in enumerate(seqs):  # min_tokens: end-of-sequence tokens are not allowed yet
            if len(s.output_ids) < s.params.min_tokens:
                banned = set(s.params.stop_token_ids) | (set() if s.params.ignore_eos else self.eos_ids)
                logits[row, list(banned)] = float("-inf")
        counts = prompt_mask = None
        if tensors.any_penalty:
            V = logits.shape[-1]
            counts = torch.zeros(len(seqs), V, dtype=torch.int32, device=logits.device)
            prompt_mask = torch.zeros(len(seqs), V, dtype=torch.bool, device=logits.device)
            for row, s in enumerate(seqs):
                if s.output_ids:
                    out = torch.tensor(s.output_ids, device=logits.device)
                    counts[row].scatter_add_(0, out, torch.ones_like(out, dtype=torch.int32))
                prompt_mask[row, s.prompt_ids] = True
        result = sample(logits, tensors, counts, prompt_mask)
        self._append(seqs, result.token_ids.tolist(), result)

    def _append(self, seqs: list[Sequence], tokens: list[int], result: SampleResult | None) -> None:
        """Append each sampled token, record logprobs, and check the stop conditions."""
        for row, (s, tok) in enumerate(zip(seqs, tokens)):
            s.output_ids.append(tok)
            if result is not None and result.logprobs is not None and s.params.logprobs is not None:
                self._record_logprobs(s, row, tok, result)
            self._check_stop(s, tok)
            if s.status is Status.FINISHED:
                self.scheduler.finish(s)

    def _record_logprobs(self, s: Sequence, row: int, tok: int, result: SampleResult) -> None:
        """The sampled token's logprob (and rank, and the request's top-k) of row `row`."""
        (entry,) = logprob_entries(result.row(row), s.params.logprobs)
        s.cumulative_logprob += entry[tok].logprob
        s.logprobs.append(entry)

    def _check_stop(self, s: Sequence, tok: int) -> None:
        """After token `tok` joined s.output_ids: its text (incrementally, engine/detokenizer.py), then the stop
        strings, end-of-sequence and stop tokens, max_tokens and the context limit, in that order."""
        reason, stop_reason = self._ending(s, tok)
        if self.tokenizer is not None:
            prev = len(s.text)
            if s.detok is None:
                s.detok = IncrementalDetokenizer(self.tokenizer, s.params.skip_special_tokens)
            s.text = s.detok.add(s.output_ids, final=reason is not None)
            if s.params.stop and self._apply_stop_strings(s, prev):
                return
        if reason is not None:
            self._finish(s, reason, stop_reason)

    def _ending(self, s: Sequence, tok: int) -> tuple[str | None, int | None]:
        """(finish_reason, stop_reason) if `tok` ends the sequence other than by a stop string, else (None, None)."""
        p, n_out = s.params, len(s.output_ids)
        if n_out >= p.min_tokens:
            if not p.ignore_eos and tok in self.eos_ids:
                return "stop", None
            if tok in p.stop_token_ids:
                return "stop", tok
        if (p.max_tokens is not None and n_out >= p.max_tokens) or len(s.prompt_ids) + n_out >= self.max_model_len:
            return "length", None
        return None, None

    def _apply_stop_strings(self, s: Sequence, prev_len: int) -> bool:
        """End at the first stop string that appears in the new text (trimmed unless asked to keep it)."""
        window = max(0, prev_len - max(len(x) for x in s.params.stop) + 1)
        hits = [(s.text.find(x, window), x) for x in s.params.stop]
        hits = [(i, x) for i, x in hits if i >= 0]
        if not hits or len(s.output_ids) < s.params.min_tokens:
            return False
        i, x = min(hits)
        s.text = s.text[: i + len(x)] if s.params.include_stop_str_in_output else s.text[:i]
        self._finish(s, "stop", x)
        return True

    @staticmethod
    def _finish(s: Sequence, reason: str, stop_reason) -> None:
        s.finish_reason, s.stop_reason = reason, stop_reason
        s.status = Status.FINISHED

    def _output(self, req: _Request) -> RequestOutput:
        if req.beam is not None:
            return self._beam_output(req)
        outs = [
            CompletionOutput(
                index=s.index,
                text=s.text,
                token_ids=list(s.output_ids),
                cumulative_logprob=s.cumulative_logprob if s.params.logprobs is not None else None,
                logprobs=list(s.logprobs) if s.params.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )  # fmt: skip
            for s in req.seqs
        ]
        req.metrics.num_preemptions = sum(s.num_preemptions for s in req.seqs)
        finished = all(s.status is Status.FINISHED for s in req.seqs)
        prompt_logprobs = req.prompt_logprobs  # complete ones never change again: shared, not copied every step
        if prompt_logprobs is not None and len(prompt_logprobs) < len(req.prompt_ids):
            prompt_logprobs = list(prompt_logprobs)
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, finished, req.metrics,
                             prompt_logprobs=prompt_logprobs,
                             num_cached_tokens=req.seqs[0].num_cached_tokens or 0)  # fmt: skip


def _plain_greedy(s: Sequence) -> bool:
    """Greedy with nothing that reads or edits the logits: the token is the argmax."""
    p = s.params
    return (
        p.greedy
        and p.logprobs is None
        and not p.logits_processors
        and not p.has_penalties
        and not p.edits_logits
        and not p.bad_words
        and len(s.output_ids) >= p.min_tokens
    )
