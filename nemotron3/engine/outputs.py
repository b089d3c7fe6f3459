"""RequestOutput / CompletionOutput: what generation returns, with vLLM's field names."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log probability of one token under the model's raw distribution, with its rank."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One of a request's n samples."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


@dataclass
class SpecDecodeMetrics:
    """Speculative decoding counters of one request (all its samples): see docs/speculative.md.

    A verify step feeds [last token, d1..dn] and emits the accepted drafts plus one bonus/correction token.
    draft_time / verify_time: wall time of the batched MTP / target forwards the request took part in.
    """

    num_steps: int = 0  # verify steps that carried at least one draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0  # accepted drafts (bonus tokens not counted)
    num_emitted_tokens: int = 0  # tokens those steps produced (accepted + bonus)
    drafted_per_position: list[int] = field(default_factory=list)  # [j]: steps with a draft at position j+1
    accepted_per_position: list[int] = field(default_factory=list)  # [j]: of those, steps that accepted it
    draft_time: float = 0.0
    verify_time: float = 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verify step (1 = no draft ever accepted, k+1 = all accepted)."""
        return self.num_emitted_tokens / self.num_steps if self.num_steps else 0.0

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    @property
    def draft_acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    spec_decode: SpecDecodeMetrics | None = None  # set when the engine decodes speculatively


@dataclass
class RequestOutput:
    """The state of one request: final from LLM.generate, or a snapshot/delta while streaming."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    extra: dict = field(default_factory=dict)
    # SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (nothing predicts it); each
    # holds the prompt token's Logprob (with its rank) and the k most likely tokens at that position. A streamed
    # request carries them in its first delta only.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # prompt tokens the first sample found in the prefix cache (EngineConfig.enable_prefix_caching; 0 without it)
    num_cached_tokens: int = 0
