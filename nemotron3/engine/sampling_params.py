"""SamplingParams: how one request is decoded, with vLLM's names, defaults and meanings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class StructuredOutputsParams:
    """vLLM's structured outputs: the output must be a JSON value of a schema (`json`, a dict or its JSON text), any
    JSON object (`json_object=True`), a full match of a regex (`regex`, engine/regex.py's subset) or one of the
    strings in `choice`. Exactly one is set. `grammar` (EBNF / Lark) is not supported."""

    json: dict | str | bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    json_object: bool | None = None
    grammar: str | None = None
    _automaton: Any = field(default=None, init=False, repr=False, compare=False)  # compiled once (automaton())

    @classmethod
    def from_value(cls, value: Any) -> StructuredOutputsParams:
        """From an instance or a dict of its fields (the server's `structured_outputs`); ValueError names a bad key."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(  # noqa: TRY004 - the API's contract: bad sampling parameters are ValueErrors
                f"structured_outputs must be a dict such as {{'regex': '...'}}, got {type(value).__name__}"
            )
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"structured_outputs: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**value)

    def validate(self) -> None:
        """Exactly one constraint, well formed: the schema or pattern compiles (errors name the field)."""
        if self.grammar is not None:
            raise ValueError(
                "structured_outputs.grammar (EBNF / Lark grammars) is not supported; use json, regex or choice"
            )
        given = [n for n in ("json", "regex", "choice") if getattr(self, n) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(
                f"structured_outputs needs exactly one of json, json_object, regex, choice; got {given or 'none'}"
            )
        (name,) = given
        if name == "choice" and not (
            isinstance(self.choice, list) and self.choice and all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError(
                f"structured_outputs.choice must be a non-empty list of non-empty strings, got {self.choice!r}"
            )
        try:
            self.automaton()
        except ValueError as e:
            raise ValueError(f"structured_outputs.{name}: {e}") from None

    def automaton(self):
        """The compiled constraint (engine/structured.py build_automaton), built on first use and then reused."""
        if self._automaton is None:
            from nemotron3.engine.structured import build_automaton

            self._automaton = build_automaton(self)
        return self._automaton


@dataclass
class SamplingParams:
    """Decoding controls for one request (vLLM semantics).

    temperature 0 means greedy. top_k ≤ 0 (or -1) disables top-k; top_p = 1 and min_p = 0 disable theirs.
    repetition_penalty (> 1 discourages) applies to prompt and generated tokens, presence/frequency
    penalties (OpenAI style, in [-2, 2]) to generated tokens only. `seed` makes sampling reproducible per
    request. `logprobs=k` returns the chosen token's logprob and rank and the top-k alternatives at each step;
    `prompt_logprobs=k` does the same for every prompt token after the first (RequestOutput.prompt_logprobs), which
    is how a prompt is scored (perplexity, multiple-choice log-likelihoods). Both are the raw model distribution's,
    before temperature, penalties or processors, as vLLM returns them by default.

    bad_words (vLLM's): words that must not be generated. Each word's token sequence (as written, and after a space)
    is refused at its last token: that token is banned whenever the tokens before it were just generated.

    truncate_prompt_tokens=k keeps only the prompt's last k tokens (vLLM's left truncation); -1 keeps as many as
    leave room for max_tokens (or one token) in the context.

    logit_bias {token_id: bias} adds each bias to that token's logit (OpenAI's and vLLM's field: -100 bans a token,
    +100 all but forces it); allowed_token_ids keeps only those tokens' logits (vLLM). Both act before penalties,
    temperature and the truncations, on every sample of the request.

    logits_processors (hook for constrained decoding, e.g. the server's response_format): callables
    `proc(logits: Tensor[V]) -> Tensor[V]` applied, in order, to this sample's raw logits before penalties
    and sampling; a processor with an `accept(token_id)` method is told the token that was chosen. They keep
    per-sequence state, so they need n == 1. The speculative (MTP) engine does not apply them.

    structured_outputs (vLLM's; a StructuredOutputsParams or a dict of its fields): the output must match a JSON
    Schema, be a JSON object, fully match a regex or be one of a list of strings. The engine gives each sample
    its own constraint (any n); it needs a tokenizer, and the speculative engine refuses it.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    bad_words: list[str] | None = None
    skip_special_tokens: bool = True
    extra: dict = field(default_factory=dict)
    logits_processors: list = field(default_factory=list)
    structured_outputs: StructuredOutputsParams | dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logits_processors = list(self.logits_processors or [])
        if self.structured_outputs is not None:
            try:
                self.structured_outputs = StructuredOutputsParams.from_value(self.structured_outputs)
            except (ValueError, TypeError) as e:
                raise ValueError(f"SamplingParams.{e}") from None
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def truncated(self, ids: list[int], max_model_len: int) -> list[int]:
        """The prompt's last truncate_prompt_tokens tokens (-1: as many as leave room for max_tokens), or all."""
        return truncate_prompt(ids, self.truncate_prompt_tokens, self.max_tokens, max_model_len)

    @property
    def edits_logits(self) -> bool:
        """logit_bias or allowed_token_ids set: the sampler changes this row's logits before anything else."""
        return bool(self.logit_bias) or self.allowed_token_ids is not None

    @property
    def has_penalties(self) -> bool:
        """Any of repetition / presence / frequency penalty active (they read the token counts)."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)

    def validate(self) -> None:
        """Raise ValueError naming the offending parameter."""
        _check(isinstance(self.n, int) and self.n >= 1, "n", "must be an integer >= 1", self.n)
        _check(self.temperature >= 0.0, "temperature", "must be >= 0", self.temperature)
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]", self.top_p)
        _check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "must be an integer >= -1 (-1 or 0 disables)", self.top_k)
        _check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]", self.min_p)
        _check(self.repetition_penalty > 0.0, "repetition_penalty", "must be > 0", self.repetition_penalty)
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]", self.presence_penalty)
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]", self.frequency_penalty)
        _check(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            "max_tokens", "must be an integer >= 1 (or None for up to the context limit)", self.max_tokens,
        )  # fmt: skip
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "must be an integer >= 0", self.min_tokens)
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", f"must be <= max_tokens ({self.max_tokens})", self.min_tokens)
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0), "logprobs", "must be None or an integer >= 0", self.logprobs)
        _check(
            self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int) and self.prompt_logprobs >= 0),
            "prompt_logprobs", "must be None or an integer >= 0", self.prompt_logprobs,
        )  # fmt: skip
        bias, allowed = self.logit_bias, self.allowed_token_ids
        _check(
            bias is None or (isinstance(bias, dict) and all(_token_id(t) and _finite(v) for t, v in bias.items())),
            "logit_bias", "must map token ids (integers >= 0) to finite numbers", bias,
        )  # fmt: skip
        _check(
            allowed is None or (isinstance(allowed, list) and bool(allowed) and all(map(_token_id, allowed))),
            "allowed_token_ids", "must be None or a non-empty list of token ids (integers >= 0)", allowed,
        )  # fmt: skip
        _check(
            self.bad_words is None or (isinstance(self.bad_words, list) and all(isinstance(w, str) and w.strip()
                                                                                for w in self.bad_words)),
            "bad_words", "must be None or a list of non-blank strings", self.bad_words,
        )  # fmt: skip
        cut = self.truncate_prompt_tokens
        _check(
            cut is None or (isinstance(cut, int) and (cut >= 1 or cut == -1)),
            "truncate_prompt_tokens", "must be None, -1 or an integer >= 1", cut,
        )  # fmt: skip
        _check(self.seed is None or isinstance(self.seed, int), "seed", "must be None or an integer", self.seed)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings", self.stop)
        _check(all(map(_token_id, self.stop_token_ids)), "stop_token_ids", "must be non-negative integers", self.stop_token_ids)
        _check(all(callable(f) for f in self.logits_processors), "logits_processors", "must be callables", self.logits_processors)
        _check(not self.logits_processors or self.n == 1, "logits_processors", "keep per-sequence state: they need n == 1", self.n)
        if self.structured_outputs is not None:
            try:
                self.structured_outputs.validate()
            except ValueError as e:
                raise ValueError(f"SamplingParams.{e}") from None


def truncate_prompt(ids: list[int], keep: int | None, max_tokens: int | None, max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: the last `keep` tokens of a prompt; -1 keeps as many as leave room for
    max_tokens (or one token) in max_model_len; None keeps all. SamplingParams and the server share this rule."""
    if keep == -1:
        keep = max(1, max_model_len - (max_tokens or 1))
    return ids[-keep:] if keep is not None and len(ids) > keep else ids


def _token_id(t: object) -> bool:
    return isinstance(t, int) and t >= 0


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _check(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} {rule}, got {value!r}")
