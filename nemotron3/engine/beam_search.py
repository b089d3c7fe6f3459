"""Beam search: the k most likely continuations of a prompt (vLLM's `BeamSearchParams` and `LLM.beam_search`).

A beam request runs in the engine beside sampled ones. Its k live beams are sequences of the scheduler; each step
computes their next-token log-probabilities in the shared batch (`candidates`). Once every live beam of the group
has them, `select` ranks all (beam, token) extensions by cumulative log-probability, as transformers' beam search
does: an end-of-sequence extension among the k best retires as a finished hypothesis, and the best k others become
the next beams. A beam kept by several children is forked (HybridCache.fork copies its Mamba state and K/V), one
kept by none is closed. Hypotheses are ranked by cumulative logprob / generated length ** length_penalty, the
end-of-sequence token counted, as transformers ranks them (vLLM counts the prompt too and not the end-of-sequence
token). The search stops once no live beam can reach the best beam_width finished hypotheses (transformers'
early_stopping="never" bound, which is exact), or at max_tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from nemotron3.engine.outputs import Logprob

if TYPE_CHECKING:
    from nemotron3.engine.scheduler import Sequence


@dataclass
class BeamSearchParams:
    """vLLM's beam-search options. temperature > 0 ranks extensions by log-softmax(logits / temperature)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BeamSearchParams.{name} must be an integer >= 1, got {value!r}")
        if not self.temperature >= 0 or math.isinf(self.temperature):
            raise ValueError(f"BeamSearchParams.temperature must be >= 0 and finite, got {self.temperature!r}")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"BeamSearchParams.length_penalty must be finite, got {self.length_penalty!r}")


@dataclass
class BeamSearchSequence:
    """One result of beam search (vLLM's fields): `tokens` and `text` hold the prompt and the continuation;
    `logprobs` has one entry per generated token, the 2k best tokens of that step with their ranks."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (end of sequence) or "length"
    stop_reason: int | None = None


@dataclass
class BeamSearchOutput:
    """A prompt's beam_width best sequences, best first."""

    sequences: list[BeamSearchSequence]


@dataclass
class Hypothesis:
    """A finished beam: its generated tokens (the end-of-sequence token included), and how it ended."""

    output_ids: list[int]
    cum_logprob: float
    logprobs: list[dict[int, Logprob]]
    finish_reason: str
    stop_reason: int | None = None


@dataclass
class BeamGroup:
    """The beam state of one request: its parameters and the hypotheses finished so far."""

    params: BeamSearchParams
    max_new: int  # max_tokens, capped by the context left after the prompt
    finished: list[Hypothesis] = field(default_factory=list)
    num_cached_tokens: int | None = None  # the prompt's tokens found in the prefix cache

    @property
    def width(self) -> int:
        return self.params.beam_width

    def score(self, h: Hypothesis) -> float:
        """cum_logprob / generated_length ** length_penalty (an end-of-sequence token counts)."""
        return h.cum_logprob / len(h.output_ids) ** self.params.length_penalty

    def best_possible(self, cum_logprob: float, generated: int) -> float:
        """An upper bound on the score of any continuation of a live beam: its cumulative logprob can only fall,
        and its length grows up to max_new (for length_penalty > 0 the longest length gives the bound, else the
        current one)."""
        n = self.max_new if self.params.length_penalty > 0 else max(generated, 1)
        return cum_logprob / n**self.params.length_penalty

    def ranked(self, hypotheses: list[Hypothesis]) -> list[Hypothesis]:
        """Hypotheses best first (the earliest finished first among equal scores)."""
        return sorted(hypotheses, key=lambda h: -self.score(h))

    def num_candidates(self, eos_ids: set[int]) -> int:
        """Tokens each beam offers per step: with e end-of-sequence tokens among them, k(1 + e) leave k others
        (transformers takes the (e + 1)k best of all beams); at least 2k, the logprobs vLLM reports."""
        e = 0 if self.params.ignore_eos else len(eos_ids)
        return self.width * max(2, 1 + e)


def step_logprobs(logits: torch.Tensor, temperatures: list[float], k: int) -> tuple[list, list]:
    """The k best next tokens of each row of logits [n, V] and their log-probabilities (of log-softmax(logits / t),
    t = 1 for temperature 0), as lists: values [n][k] (descending), ids [n][k]."""
    t = torch.tensor([x if x > 0 else 1.0 for x in temperatures], dtype=torch.float32, device=logits.device)
    lp = torch.log_softmax(logits.float() / t[:, None], dim=-1)
    values, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
    return values.tolist(), ids.tolist()


@dataclass
class Child:
    """A selected extension: parent (its index among the live beams), token, new cumulative logprob, and the
    parent row's logprob entries of this step."""

    parent: int
    token: int
    cum_logprob: float
    entry: dict[int, Logprob]


def select(group: BeamGroup, beams: list[Sequence], eos_ids: set[int]) -> list[Child]:
    """One beam-search step over the live beams, each with its `candidates` (step_logprobs). Ranks every extension
    by its new cumulative logprob (ties: the earlier beam, then the better rank in its row); an end-of-sequence
    extension among the best `width` joins group.finished; the best `width` others are returned, best first."""
    eos = set() if group.params.ignore_eos else eos_ids
    entries = [{t: Logprob(v, rank=r + 1) for r, (v, t) in enumerate(zip(*s.candidates))} for s in beams]
    ranked = sorted(
        ((s.cumulative_logprob + v, b, r, t) for b, s in enumerate(beams) for r, (v, t) in enumerate(zip(*s.candidates))),
        key=lambda c: (-c[0], c[1], c[2]),
    )  # fmt: skip
    children: list[Child] = []
    for place, (cum, b, _, t) in enumerate(ranked):
        if t in eos:
            if place < group.width:
                s = beams[b]
                group.finished.append(Hypothesis([*s.output_ids, t], cum, [*s.logprobs, entries[b]], "stop"))
            continue
        children.append(Child(b, t, cum, entries[b]))
        if len(children) == group.width:
            break
    return children
