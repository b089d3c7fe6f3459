"""Reasoning modes and the thinking budget, driven from outside the engine.

Nemotron 3 chat models think inside a `<think> ... </think>` span that opens every assistant turn. The chat
template's generation prompt either opens the span (`<think>\\n`, thinking on) or writes it empty
(`<think></think>`, thinking off). Three modes follow:

- on: the model thinks as long as it likes (up to max_tokens);
- off: `enable_thinking=False` in the template, no reasoning tokens at all;
- bounded: thinking on with a token budget. When the model has produced `budget` reasoning tokens without
  closing the span, the span is closed for it the way the real stack does: the closing text
  (`CLOSE_TEXT`, "\\n</think>\\n" as the template writes it) is injected and the model then answers. The
  request is continued as a new request whose prompt is the original prompt + the kept reasoning tokens +
  the closing tokens, so no engine hook is needed and it works with any engine (speculative ones too).

`reasoning_effort` (OpenAI's field) maps to budgets: none → off, minimal/low/medium → `EFFORT_BUDGETS`,
high → unbounded. An explicit budget wins over the effort. Reasoning tokens (the span's content plus the
injected closing tokens) are counted separately from the answer's.

Two drivers share these rules: `stream_with_budget` (async, one sample, over an AsyncLLM-like client; the
server uses it) and `generate_with_budget` (synchronous, batched over `LLM.generate`; offline use, e.g.
`chat(llm, messages, ...)`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from nemotron3.engine.sampling_params import SamplingParams

THINK_START, THINK_END = "<think>", "</think>"
CLOSE_TEXT = "\n" + THINK_END + "\n"
"""What the budget injects: the end of the reasoning span exactly as the chat template writes it."""

EFFORT_BUDGETS: dict[str, int | None] = {"minimal": 64, "low": 256, "medium": 1024, "high": None}
"""reasoning_effort → reasoning-token budget (None: unbounded); "none" turns thinking off."""


@dataclass(frozen=True)
class ReasoningConfig:
    """enabled: the template opens the think span; budget: max reasoning tokens before the forced close."""

    enabled: bool = True
    budget: int | None = None

    @classmethod
    def resolve(
        cls,
        enable_thinking: bool | None = None,
        reasoning_effort: str | None = None,
        budget: int | None = None,
        effort_budgets: dict[str, int | None] | None = None,
    ) -> ReasoningConfig:
        """Combine the request's switches; raises ValueError for an unknown effort or a negative budget."""
        budgets = EFFORT_BUDGETS if effort_budgets is None else effort_budgets
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 0):
            raise ValueError(f"thinking budget must be an integer >= 0, got {budget!r}")
        enabled = True if enable_thinking is None else bool(enable_thinking)
        if reasoning_effort is not None:
            if reasoning_effort == "none":
                enabled = False
            elif reasoning_effort in budgets:
                budget = budgets[reasoning_effort] if budget is None else budget
            else:
                raise ValueError(f"reasoning_effort must be one of {['none', *budgets]}, got {reasoning_effort!r}")
        return cls(enabled, budget if enabled else None)


@dataclass(frozen=True)
class ThinkTokens:
    """The tokenizer's view of the span: the `</think>` token id (None if not one token) and the closing ids."""

    think_end_id: int | None
    close_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ThinkTokens:
        end = tokenizer.encode(THINK_END)
        return cls(end[0] if len(end) == 1 else None, tuple(tokenizer.encode(CLOSE_TEXT)))


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt ends inside an open think span (generation starts with reasoning)."""
    tail = prompt.rstrip()
    return tail.endswith(THINK_START)


def split_reasoning(text: str, in_reasoning: bool = True) -> tuple[str | None, str]:
    """(reasoning, content) of a finished output. in_reasoning: the prompt opened the span.

    Without `</think>` the whole text is reasoning when the span was open (the budget or max_tokens ended
    it), else content. A `<think>` the model writes itself opens a span too.
    """
    if not in_reasoning:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_START):
            return None, text
        text, in_reasoning = stripped[len(THINK_START) :], True
    if THINK_END not in text:
        return text.strip(), ""
    reasoning, content = text.split(THINK_END, 1)
    return reasoning.strip(), content.lstrip()


# ------------------------------------------------------------------------------------------ async driver
@dataclass
class Piece:
    """A streamed piece of one sample: new tokens and text; `reasoning_tokens` so far; set when finished."""

    token_ids: list[int]
    text: str
    logprobs: list | None = None  # one {token_id: Logprob} per token (None entries for injected tokens)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    reasoning_tokens: int = 0
    forced: bool = False  # the injected closing tokens
    prompt_logprobs: list | None = None  # the prompt's (SamplingParams.prompt_logprobs), in one piece only
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (RequestOutput.num_cached_tokens)


def count_reasoning_tokens(ids: list[int], in_reasoning: bool, think_end_id: int | None) -> int:
    """Tokens of a finished reply inside its reasoning span (the closing tag counted), as the streaming budget
    counts them."""
    counter = _Counter(in_reasoning)
    counter.take(ids, None, think_end_id)
    return counter.reasoning_tokens


@dataclass
class _Counter:
    in_reasoning: bool
    reasoning_tokens: int = 0
    kept: list[int] = field(default_factory=list)

    def take(self, ids: list[int], budget: int | None, think_end_id: int | None) -> tuple[int, bool]:
        """How many of `ids` to keep under the budget, and whether the budget cut the span."""
        for i, tok in enumerate(ids):
            if not self.in_reasoning:
                self.kept.extend(ids[i:])
                return len(ids), False
            if tok == think_end_id:
                self.in_reasoning = False
                self.reasoning_tokens += 1
                self.kept.append(tok)
                continue
            if budget is not None and self.reasoning_tokens >= budget:
                return i, True
            self.reasoning_tokens += 1
            self.kept.append(tok)
        return len(ids), False


async def stream_with_budget(
    client,
    prompt_ids: list[int],
    params: SamplingParams,
    config: ReasoningConfig,
    think: ThinkTokens,
    tokenizer,
    *,
    in_reasoning: bool,
    request_id: str,
    processors: Callable[[bool], list] | None = None,
    fork_of: str | None = None,
) -> AsyncIterator[Piece]:
    """Run one sample (params.n must be 1) and yield its Pieces, enforcing the reasoning budget.

    client.generate(prompt, params, request_id) is AsyncLLM's async iterator of RequestOutput deltas.
    processors(in_reasoning) builds fresh logits processors for a phase (e.g. a JSON constraint that waits
    for the end of the span). fork_of: the request id of another sample of the same prompt, whose prefill the first
    phase may copy (LLMEngine.add_request). Leaving the iteration early cancels the engine request.
    """
    if params.n != 1:
        raise ValueError("stream_with_budget runs one sample: n must be 1")
    if params.truncate_prompt_tokens is not None:  # once, here: the answer phase's prompt extends the truncated one
        prompt_ids = params.truncated(list(prompt_ids), client.max_model_len)
        params = dataclasses.replace(params, truncate_prompt_tokens=None)
    budget = config.budget if (in_reasoning and think.think_end_id is not None) else None
    counter = _Counter(in_reasoning)
    total_max = params.max_tokens

    def phase_params(max_tokens, in_span: bool, seed_offset: int, score_prompt: bool = True) -> SamplingParams:
        seed = None if params.seed is None else params.seed + seed_offset
        return dataclasses.replace(
            params, max_tokens=max_tokens, seed=seed, min_tokens=min(params.min_tokens, max_tokens or params.min_tokens),
            logits_processors=processors(in_span) if processors else list(params.logits_processors),
            prompt_logprobs=params.prompt_logprobs if score_prompt else None,
        )  # fmt: skip

    def prompt_part(out) -> list | None:  # the caller's prompt's logprobs (a second phase's prompt is longer)
        return None if out.prompt_logprobs is None else out.prompt_logprobs[: len(prompt_ids)]

    cut = budget == 0
    scored = False  # the prompt logprobs went out in the first phase
    if not cut:
        sent_text = 0
        shared = {"fork_of": fork_of} if fork_of is not None else {}
        agen = client.generate(
            {"prompt_token_ids": list(prompt_ids)}, phase_params(total_max, in_reasoning, 0), request_id, **shared
        )
        try:
            async for out in agen:
                c = out.outputs[0]
                scored = scored or out.prompt_logprobs is not None
                n_keep, cut = counter.take(list(c.token_ids), budget, think.think_end_id)
                if cut:
                    # the budget ends inside this delta: keep n_keep tokens, text re-decoded from the kept ids
                    text = tokenizer.decode(counter.kept)[sent_text:] if tokenizer is not None else ""
                    lps = c.logprobs[:n_keep] if c.logprobs is not None else None
                    if n_keep or text or out.prompt_logprobs is not None:
                        yield Piece(c.token_ids[:n_keep], text, lps, reasoning_tokens=counter.reasoning_tokens,
                                    prompt_logprobs=prompt_part(out), num_cached_tokens=out.num_cached_tokens)  # fmt: skip
                    break
                sent_text += len(c.text)
                yield Piece(list(c.token_ids), c.text, c.logprobs, c.finish_reason, c.stop_reason,
                            counter.reasoning_tokens, prompt_logprobs=prompt_part(out),
                            num_cached_tokens=out.num_cached_tokens)  # fmt: skip
                if out.finished:
                    return
        finally:
            await agen.aclose()
        if not cut:
            return
    # -- the budget is spent: inject the closing tokens, then continue the request as a new one
    close = list(think.close_ids)
    counter.reasoning_tokens += len(close)
    used = len(counter.kept) + len(close)
    remaining = None if total_max is None else total_max - used
    done = remaining is not None and remaining < 1
    yield Piece(close, tokenizer.decode(close) if tokenizer is not None else "",
                [None] * len(close) if params.logprobs is not None else None,
                "length" if done else None, None, counter.reasoning_tokens, forced=True)  # fmt: skip
    if done:
        return
    prompt2 = list(prompt_ids) + counter.kept + close
    agen = client.generate({"prompt_token_ids": prompt2}, phase_params(remaining, False, 1, not scored),
                           request_id + "-answer")  # fmt: skip
    try:
        async for out in agen:
            c = out.outputs[0]
            yield Piece(list(c.token_ids), c.text, c.logprobs, c.finish_reason, c.stop_reason, counter.reasoning_tokens,
                        prompt_logprobs=prompt_part(out))  # fmt: skip
            if out.finished:
                return
    except ValueError as e:  # e.g. prompt + reasoning now fills the context: the answer has no room
        if "max_model_len" not in str(e):
            raise
        yield Piece([], "", None, "length", None, counter.reasoning_tokens)
    finally:
        await agen.aclose()


# ------------------------------------------------------------------------------------------ offline driver
@dataclass
class BudgetedOutput:
    """One sample of `generate_with_budget`: all generated ids (incl. injected), text, counts, finish."""

    token_ids: list[int]
    text: str
    reasoning_tokens: int
    finish_reason: str | None
    stop_reason: int | str | None = None


def generate_with_budget(
    llm, prompts: list[list[int]], params: SamplingParams, config: ReasoningConfig, *, in_reasoning: bool = True
) -> list[list[BudgetedOutput]]:
    """Batched offline generation with the budget: one list of n samples per prompt (token-id prompts).

    Phase 1 stops every sample at the budget; samples still inside the span get the closing tokens and,
    like those that closed it in time but still had room, continue in phase 2 up to max_tokens.
    """
    tok = llm.get_tokenizer()
    think = ThinkTokens.from_tokenizer(tok)
    if params.truncate_prompt_tokens is not None:  # once, here: phase 2's prompts extend the truncated ones
        prompts = [params.truncated(list(p), llm.engine.max_model_len) for p in prompts]
        params = dataclasses.replace(params, truncate_prompt_tokens=None)
    budget = config.budget if (in_reasoning and think.think_end_id is not None) else None
    total_max = params.max_tokens
    if budget is None or (total_max is not None and total_max <= budget):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        return [[_finished(list(c.token_ids), c.text, c.finish_reason, c.stop_reason, think, in_reasoning)
                 for c in o.outputs] for o in outs]  # fmt: skip
    results: list[list[BudgetedOutput]] = []
    cont: list[tuple[int, int, list[int], int]] = []  # (prompt idx, sample idx, phase-2 prompt, max tokens)
    if budget > 0:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], dataclasses.replace(params, max_tokens=budget))
    else:
        outs = [None] * len(prompts)
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        samples = []
        for j in range(params.n):
            c = out.outputs[j] if out is not None else None
            ids = list(c.token_ids) if c is not None else []
            if c is not None and c.finish_reason != "length":  # ended (eos / stop) within the budget
                samples.append(_finished(ids, c.text, c.finish_reason, c.stop_reason, think, in_reasoning))
                continue
            closed = think.think_end_id in ids
            injected = [] if closed else list(think.close_ids)
            ids = ids + injected
            n_reason = ids.index(think.think_end_id) + 1 if closed else len(ids)
            samples.append(BudgetedOutput(ids, tok.decode(ids), n_reason, "length"))
            left = None if total_max is None else total_max - len(ids)
            if left is None or left >= 1:
                cont.append((i, j, list(prompt) + ids, left))
        results.append(samples)
    for i, j, prompt2, left in cont:  # one request per continuation: each has its own max_tokens
        p2 = dataclasses.replace(
            params, n=1, max_tokens=left, seed=None if params.seed is None else params.seed + 1 + j
        )
        try:
            c = llm.generate({"prompt_token_ids": prompt2}, p2)[0].outputs[0]
        except ValueError:  # no room left in the context
            continue
        prev = results[i][j]
        ids = prev.token_ids + list(c.token_ids)
        results[i][j] = BudgetedOutput(ids, tok.decode(ids), prev.reasoning_tokens, c.finish_reason, c.stop_reason)
    return results


def _finished(ids, text, finish_reason, stop_reason, think: ThinkTokens, in_reasoning: bool) -> BudgetedOutput:
    if not in_reasoning:
        n = 0
    elif think.think_end_id in ids:
        n = ids.index(think.think_end_id) + 1
    else:
        n = len(ids)
    return BudgetedOutput(ids, text, n, finish_reason, stop_reason)


@dataclass
class ChatOutput:
    """A parsed assistant turn from `chat`."""

    reasoning_content: str | None
    content: str
    token_ids: list[int]
    reasoning_tokens: int
    finish_reason: str | None


def chat(
    llm,
    messages: list[dict],
    params: SamplingParams | None = None,
    *,
    enable_thinking: bool | None = None,
    reasoning_effort: str | None = None,
    thinking_budget: int | None = None,
    tools: list[dict] | None = None,
) -> list[ChatOutput]:
    """Offline chat with reasoning modes: `chat(LLM("default"), [{"role": "user", "content": "hi"}],
    SamplingParams(max_tokens=64), thinking_budget=16)` → n ChatOutputs (reasoning split from content)."""
    params = params or SamplingParams()
    config = ReasoningConfig.resolve(enable_thinking, reasoning_effort, thinking_budget)
    tok = llm.get_tokenizer()
    if tok is None:
        raise ValueError("chat needs a model with a tokenizer and a chat template")
    prompt = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, enable_thinking=config.enabled)
    in_reasoning = prompt_opens_thinking(prompt)
    outs = generate_with_budget(llm, [tok.encode(prompt)], params, config, in_reasoning=in_reasoning)[0]
    result = []
    for o in outs:
        reasoning, content = split_reasoning(o.text, in_reasoning)
        result.append(ChatOutput(reasoning, content, o.token_ids, o.reasoning_tokens, o.finish_reason))
    return result
