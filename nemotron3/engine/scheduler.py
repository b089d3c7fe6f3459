"""Continuous batching: which sequences run this step and how many tokens each feeds.

Policy (as vLLM v1): running sequences first, oldest first; each decode takes one token, each
unfinished prefill a chunk, all under a per-step token budget; then waiting sequences are admitted
oldest first while a state slot, K/V blocks and budget remain. When the block pool runs dry the
newest running sequence is preempted: its slot and blocks go back to the pools and it re-enters the
queue, ahead of every newer request, to be recomputed (prompt + generated tokens) later. The oldest
request always makes progress, so none starves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from nemotron3.engine.cache import HybridCache, SeqCache
from nemotron3.engine.detokenizer import IncrementalDetokenizer
from nemotron3.engine.sampling_params import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sample stream of a request: prompt, generated tokens and its place in the cache."""

    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int  # admission order: lower is older
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    cache: SeqCache | None = None
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""
    detok: IncrementalDetokenizer | None = None  # the engine's incremental decoding of output_ids into `text`
    cumulative_logprob: float = 0.0
    logprobs: list = field(default_factory=list)
    num_preemptions: int = 0
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at first admission
    branch_point: int = 0  # prefix caching: where this sequence leaves the cached blocks, past its resume point
    num_spec: int = 0  # draft tokens to verify with the next decode (speculative decoding; 0 = plain decode)
    beam: Any = None  # a beam of this BeamGroup (engine/beam_search.py), or None
    # a beam's next-token logprobs and ids (beam_search.step_logprobs), held until every beam of its group has them
    candidates: tuple[list[float], list[int]] | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def last_id(self) -> int:
        """The newest token (all_ids[-1] without copying a 32k-token list every decode step)."""
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def ids_slice(self, start: int, stop: int) -> list[int]:
        """all_ids[start:stop] without building all_ids."""
        n = len(self.prompt_ids)
        if stop <= n:
            return self.prompt_ids[start:stop]
        if start >= n:
            return self.output_ids[start - n : stop - n]
        return self.prompt_ids[start:] + self.output_ids[: stop - n]

    @property
    def num_computed(self) -> int:
        return self.cache.num_tokens if self.cache else 0

    @property
    def num_pending(self) -> int:
        """Tokens known but not yet in the cache (the prompt, a recompute, or the last sampled token)."""
        return len(self.prompt_ids) + len(self.output_ids) - self.num_computed

    @property
    def is_decode(self) -> bool:
        return self.num_pending == 1 and self.num_computed >= len(self.prompt_ids)


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 512  # per-step token budget (prefill chunks + decodes)
    max_num_seqs: int = 64
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


@dataclass
class Scheduled:
    """The step's work: sequences with the number of tokens each feeds, decodes first."""

    decodes: list[Sequence]
    prefills: list[tuple[Sequence, int]]
    preempted: list[Sequence]

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: HybridCache) -> None:
        self.config = config
        self.cache = cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache (first admissions; vLLM's name)
        self.prefix_cache_hits = 0  # of those, tokens found

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's cache and drop it from the queues."""
        if seq.cache is not None:
            self.cache.close(seq.cache)
            seq.cache = None
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def requeue(self, seq: Sequence) -> None:
        """Queue a sequence to (re)compute behind the waiting ones that arrived no later: the queue stays oldest
        first, so a preempted sequence goes ahead of every newer request."""
        at = next((i for i, w in enumerate(self.waiting) if w.arrival > seq.arrival), len(self.waiting))
        self.waiting.insert(at, seq)

    def _preempt(self, seq: Sequence) -> None:
        self.cache.close(seq.cache)
        seq.cache = None
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        seq.num_spec = 0
        self.running.remove(seq)
        self.requeue(seq)

    def _room(self, seq: Sequence) -> int:
        """Tokens the sequence could add with the blocks it has plus all free blocks."""
        if not self.cache.has_attention:
            return 1 << 62
        c = seq.cache
        return (self.cache.available_blocks() + len(c.blocks)) * self.cache.block_size - c.num_tokens

    def schedule(self) -> Scheduled:
        budget = self.config.max_num_batched_tokens
        decodes: list[Sequence] = []
        prefills: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        self.running.sort(key=lambda s: s.arrival)
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or budget == 0 or not seq.num_pending:
                continue  # (nothing pending: a beam waiting for the rest of its group)
            if seq.is_decode:  # a decode feeds its last token plus any drafts, within the budget
                seq.num_spec = max(0, min(seq.num_spec, budget - 1, self._room(seq) - 1))  # drafts never preempt
                want = 1 + seq.num_spec
            else:
                want = min(seq.num_pending, budget)
            if not self.config.enable_chunked_prefill and not seq.is_decode:
                want = seq.num_pending
            while self._room(seq) < want:  # pool dry: preempt the newest running sequence
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            self.cache.grow(seq.cache, want)
            budget -= want
            if seq.is_decode:
                decodes.append(seq)
            else:
                prefills.append((seq, want))
        if not preempted:
            budget = self._admit(budget, decodes, prefills)
        while not (decodes or prefills) and self.waiting:
            # every running sequence is a beam waiting for the rest of its group (engine/beam_search.py), and the
            # queue's head does not fit: the newest such beam makes room (it recomputes later). The head is no newer
            # than any waiting group, so this ends with the head admitted.
            held = [s for s in self.running if not s.num_pending]
            if not held:
                break
            self._preempt(held[-1])
            preempted.append(held[-1])
            budget = self._admit(budget, decodes, prefills)
        decodes.sort(key=lambda s: s.cache.slot)
        return Scheduled(decodes, prefills, preempted)

    def _admit(self, budget: int, decodes: list[Sequence], prefills: list[tuple[Sequence, int]]) -> int:
        """Admit waiting sequences, oldest first, while a state slot, K/V blocks and budget remain; returns the
        budget left."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not len(self.cache.free_slots):
                break
            cached, depth = self._cached_prefix(seq)
            pending = seq.num_pending - len(cached) * self.cache.block_size
            want = min(pending, budget) if self.config.enable_chunked_prefill else pending
            if want > budget and (decodes or prefills):
                break  # an unchunked prompt waits for a step of its own
            blocks = self.cache.blocks_needed(None, want)  # a cached prefix ends on a block end
            if blocks > self.cache.available_blocks(cached):
                break
            self.waiting.popleft()
            seq.cache = self.cache.open(cached)
            seq.branch_point = depth * self.cache.block_size if depth > len(cached) else 0
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = seq.cache.num_tokens
                if self.cache.prefix is not None:
                    self.prefix_cache_queries += len(seq.prompt_ids)
                    self.prefix_cache_hits += seq.num_cached_tokens
            self.cache.grow(seq.cache, want)
            seq.status = Status.RUNNING
            self.running.append(seq)
            budget -= want
            prefills.append((seq, want))
        return budget

    def _cached_prefix(self, seq: Sequence) -> tuple[list, int]:
        """PrefixCache.match for a waiting sequence: the nodes it resumes after, and the cached depth in blocks
        (nothing without prefix caching, or for a request that scores its prompt: it needs every position's
        logits)."""
        if self.cache.prefix is None or seq.params.prompt_logprobs is not None:
            return [], 0
        return self.cache.prefix.match(seq.all_ids)
