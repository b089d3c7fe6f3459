"""The OpenAI-compatible HTTP server: `create_app(client)` → a FastAPI app.

Endpoints: POST /v1/chat/completions, POST /v1/completions (SSE streaming or not), GET /v1/models,
GET /health, GET /metrics (Prometheus text). One engine serves every request: `AsyncLLM` runs the engine
loop on its own thread and batches the requests of all connections together (continuous batching); each
HTTP request is a set of async iterators over it. A client that disconnects cancels its requests (their
cache returns to the pools at once). Every error is answered with an OpenAI-style body
{"error": {"message", "type", "param", "code"}} and the server keeps serving.

Chat requests: the checkpoint's chat template renders the messages (tools, enable_thinking); the output is
split into `reasoning_content` and `content`, tool calls are parsed into `tool_calls`, the reasoning budget
(thinking_budget / reasoning_effort) is enforced by nemotron3.engine.reasoning, and response_format is
enforced by constrained decoding (nemotron3.engine.structured). n > 1 runs n engine requests (seed + i),
so that each sample has its own budget and constraint state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nemotron3.engine.beam_search import BeamSearchParams
from nemotron3.engine.reasoning import (
    ReasoningConfig,
    ThinkTokens,
    count_reasoning_tokens,
    prompt_opens_thinking,
    stream_with_budget,
)
from nemotron3.engine.sampling_params import SamplingParams, StructuredOutputsParams, truncate_prompt
from nemotron3.serve.beam_search import beam_search_params
from nemotron3.serve.metrics import Metrics
from nemotron3.serve.parsers import (
    ReasoningStreamParser,
    ToolCallStreamParser,
    parse_reasoning,
    parse_tool_calls,
    validate_tools,
)
from nemotron3.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
    new_id,
    now,
)

# ------------------------------------------------------------------------------------------ engine client


class EngineClient:
    """What the server needs from an engine; wraps an `AsyncLLM`. Tests may pass a double with these names.

    generate(prompt, params, request_id, fork_of=None) → async iterator of RequestOutput deltas (AsyncLLM.generate;
    fork_of, passed only for the 2nd … nth sample of a prompt, names the request whose prefill it may copy);
    optionally holding() → a context manager inside which added requests start in the same step;
    tokenizer, max_model_len, vocab_size, eos_ids; supports_logits_processors (False for the speculative
    engine, which does not apply them); stats() → gauges for /metrics; alive(); shutdown().
    """

    def __init__(self, async_llm) -> None:
        self.async_llm = async_llm
        engine = async_llm.engine
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model.config.vocab_size
        self.eos_ids = set(engine.eos_ids)
        self.supports_logits_processors = type(engine).__name__ == "LLMEngine"

    def generate(self, prompt, params: SamplingParams, request_id: str, fork_of: str | None = None) -> AsyncIterator:
        return self.async_llm.generate(prompt, params, request_id, fork_of=fork_of)

    def holding(self):
        """AsyncLLM.holding: requests added inside start in the same engine step."""
        return self.async_llm.holding()

    def stats(self) -> dict:
        e = self.engine
        cache, sched = e.cache, e.scheduler
        out = {"num_requests_running": len(sched.running), "num_requests_waiting": len(sched.waiting)}
        if cache.has_attention and cache.num_blocks:
            free = cache.available_blocks()  # cached blocks no request holds count as free, as in vLLM
            out["kv_cache_usage_ratio"] = round(1 - free / cache.num_blocks, 6)
            out["kv_cache_blocks_free"] = free
        out["state_slots_free"] = len(cache.free_slots)
        if cache.prefix is not None:  # vLLM's prefix-cache counters, in tokens
            out["prefix_cache_queries"] = sched.prefix_cache_queries
            out["prefix_cache_hits"] = sched.prefix_cache_hits
            out["prefix_cache_blocks"] = cache.prefix.num_nodes
        return out

    def alive(self) -> bool:
        thread = getattr(self.async_llm, "_thread", None)
        return thread is None or thread.is_alive()

    def shutdown(self) -> None:
        self.async_llm.shutdown()


# ------------------------------------------------------------------------------------------ app


@dataclass
class ServeConfig:
    model_names: list[str] = field(default_factory=lambda: ["default"])
    api_key: str | None = None
    cors_origins: list[str] | None = None
    effort_budgets: dict[str, int | None] | None = None  # reasoning_effort → budget (None: engine defaults)
    disconnect_poll_s: float = 0.25


def create_app(client, config: ServeConfig | None = None) -> FastAPI:
    cfg = config or ServeConfig()
    app = FastAPI(title="nemotron3", docs_url=None, redoc_url=None)
    metrics = Metrics(_stats_of(client))
    server = _Server(client, cfg, metrics)
    app.state.server = server

    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in cfg.cors_origins)  # fmt: skip

    if cfg.api_key:

        @app.middleware("http")
        async def check_key(request: Request, call_next):
            if request.url.path.startswith("/v1") and request.method != "OPTIONS":
                auth = request.headers.get("authorization", "")
                if auth != f"Bearer {cfg.api_key}":
                    return JSONResponse(
                        error_body("Incorrect or missing API key (Authorization: Bearer ...)", code="invalid_api_key"),
                        status_code=401,
                    )
            return await call_next(request)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        metrics.request_done(request.url.path, e.status)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return JSONResponse(error_body(_validation_message(e.errors())), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        metrics.request_done(request.url.path, 500)
        return JSONResponse(error_body(f"internal error: {e!r}", "internal_server_error"), status_code=500)

    @app.get("/health")
    async def health():
        if not client.alive():
            return JSONResponse(error_body("engine loop is not running", "internal_server_error"), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        data = [{"id": name, "object": "model", "created": now(), "owned_by": "nemotron3",
                 "max_model_len": client.max_model_len} for name in cfg.model_names]  # fmt: skip
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        server.check_model(name)
        return {"id": name, "object": "model", "created": now(), "owned_by": "nemotron3",
                "max_model_len": client.max_model_len}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = _parse(ChatCompletionRequest, await _body(request))
        return await server.chat(req, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = _parse(CompletionRequest, await _body(request))
        return await server.completion(req, request)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return server.tokenize(_parse(TokenizeRequest, await _body(request)))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return server.detokenize(_parse(DetokenizeRequest, await _body(request)))

    @app.get("/version")
    async def version():
        return {"version": _package_version()}

    return app


def _stats_of(client):
    stats = getattr(client, "stats", None)
    return stats if callable(stats) else None


async def _body(request: Request):
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


def _parse(model, body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as e:
        errors = e.errors()
        param = ".".join(str(x) for x in errors[0]["loc"]) if errors else None
        raise APIError(400, _validation_message(errors), param=param) from None


def _validation_message(errors) -> str:
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts)


# ------------------------------------------------------------------------------------------ request handling


@dataclass
class _Job:
    """One sample of one prompt, as run by stream_with_budget."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams | BeamSearchParams
    reasoning: ReasoningConfig
    in_reasoning: bool
    processors: object = None
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    reasoning_tokens: int = 0
    prompt_logprobs: list | None = None  # [None, {token_id: Logprob}, ...] when its params ask for them
    fork_of: int | None = None  # the index of the job (same prompt) whose prefill this one copies
    num_cached_tokens: int = 0  # prompt tokens its first phase found in the prefix cache


class _Server:
    def __init__(self, client, cfg: ServeConfig, metrics: Metrics) -> None:
        self.client, self.cfg, self.metrics = client, cfg, metrics
        self.tokenizer = client.tokenizer
        self.think = ThinkTokens.from_tokenizer(self.tokenizer) if self.tokenizer is not None else ThinkTokens(None, ())
        self._token_text: dict[int, str] = {}

    # ------------------------------------------------------------------ shared checks
    def check_model(self, name: str | None) -> str:
        if name is None or name in self.cfg.model_names:
            return name or self.cfg.model_names[0]
        raise APIError(404, f"The model `{name}` does not exist. Served: {self.cfg.model_names}",
                       "not_found_error", "model", "model_not_found")  # fmt: skip

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: only token-id prompts to /v1/completions are served")

    def _max_tokens(self, requested: int | None, prompt_len: int, default: int | None) -> int:
        room = self.client.max_model_len - prompt_len
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {self.client.max_model_len} tokens; the "
                           f"prompt has {prompt_len} tokens, leaving no room to generate.", param="messages",
                           code="context_length_exceeded")  # fmt: skip
        if requested is None:
            return room if default is None else min(default, room)
        if prompt_len + requested > self.client.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.client.max_model_len} tokens. However, "
                           f"you requested {prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} "
                           "for the completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")  # fmt: skip
        return requested

    def _params(
        self, req, max_tokens: int, logprobs: int | None, seed_offset: int, prompt_logprobs: int | None
    ) -> SamplingParams:
        if req.stream and req.prompt_logprobs is not None:  # vLLM refuses it too: responses carry them, chunks do not
            raise APIError(400, "prompt_logprobs are not available when stream is true", param="prompt_logprobs")
        opts = {
            "n": 1, "max_tokens": max_tokens, "logprobs": logprobs, "min_tokens": min(req.min_tokens, max_tokens),
            "prompt_logprobs": prompt_logprobs,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p, "top_k": req.top_k or 0, "min_p": req.min_p or 0.0,
            "presence_penalty": req.presence_penalty or 0.0, "frequency_penalty": req.frequency_penalty or 0.0,
            "repetition_penalty": req.repetition_penalty or 1.0, "stop": req.stop, "stop_token_ids": req.stop_token_ids,
            "ignore_eos": req.ignore_eos, "skip_special_tokens": req.skip_special_tokens,
            "include_stop_str_in_output": req.include_stop_str_in_output,
            "seed": None if req.seed is None else req.seed + seed_offset,
            "logit_bias": _logit_bias(req.logit_bias), "allowed_token_ids": req.allowed_token_ids,
            "bad_words": req.bad_words,
        }  # fmt: skip
        try:
            params = SamplingParams(**opts)
        except ValueError as e:
            raise APIError(400, str(e).replace("SamplingParams.", "")) from None
        for name, ids in (("logit_bias", params.logit_bias), ("allowed_token_ids", params.allowed_token_ids)):
            if ids:  # refused here, before a stream starts, rather than by the engine
                self._check_ids(list(ids), name)
        return params

    def _check_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        bad = [t for t in ids if not 0 <= t < self.client.vocab_size]
        if bad:
            raise APIError(400, f"{param}: token ids {bad[:5]} are outside the vocabulary "
                           f"[0, {self.client.vocab_size})", param=param)  # fmt: skip

    # ------------------------------------------------------------------ chat
    def _render(
        self, req: ChatCompletionRequest, add_generation_prompt: bool = True, continue_final_message: bool = False
    ) -> tuple[str, ReasoningConfig, list[dict] | None]:
        self._need_tokenizer()
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        try:
            validate_tools(tools)
        except ValueError as e:
            raise APIError(400, str(e), param="tools") from None
        choice = req.tool_choice
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            match = [t for t in tools or [] if t["function"]["name"] == name]
            if not match:
                raise APIError(400, f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
            tools = match
        elif choice == "none":
            tools = None
        elif choice == "required" and not tools:
            raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
        kwargs = dict(req.chat_template_kwargs or {})
        for key in ("chat_template", "continue_final_message", "add_generation_prompt", "tools"):
            if key in kwargs:  # options of the renderer, not template variables: a request may not set them here
                raise APIError(400, f"chat_template_kwargs may not set {key!r}", param="chat_template_kwargs")
        budget = req.thinking_budget
        for key in ("thinking_budget", "reasoning_budget"):
            value = kwargs.pop(key, None)
            if budget is None:
                budget = value if value is not None else (req.model_extra or {}).get(key)
        try:
            reasoning = ReasoningConfig.resolve(kwargs.pop("enable_thinking", None), req.reasoning_effort, budget,
                                                self.cfg.effort_budgets)  # fmt: skip
        except ValueError as e:
            raise APIError(400, str(e), param="thinking_budget") from None
        messages = [_message_dict(m, i) for i, m in enumerate(req.messages)]
        try:
            prompt = self.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, enable_thinking=reasoning.enabled, **kwargs,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - template errors are the request's fault (bad message shapes)
            raise APIError(400, f"could not render the chat template: {e}", param="messages") from None
        return prompt, reasoning, tools

    # ------------------------------------------------------------------ tokenizer endpoints (vLLM's)
    def tokenize(self, req: TokenizeRequest) -> dict:
        """The token ids the server would feed for a prompt (as /v1/completions encodes it) or for chat messages
        (rendered as /v1/chat/completions renders them, thinking options included)."""
        self.check_model(req.model)
        self._need_tokenizer()
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "tokenize needs exactly one of prompt and messages", param="prompt")
        text = req.prompt
        if req.messages is not None:
            chat = ChatCompletionRequest(messages=req.messages, tools=req.tools,
                                         chat_template_kwargs=req.chat_template_kwargs)  # fmt: skip
            text, _, _ = self._render(chat, req.add_generation_prompt, req.continue_final_message)
        ids = self.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.client.max_model_len, "tokens": ids, "token_strs": strs}

    def detokenize(self, req: DetokenizeRequest) -> dict:
        """The text of token ids, special tokens included."""
        self.check_model(req.model)
        self._need_tokenizer()
        if req.tokens:
            self._check_ids(req.tokens, "tokens")
        return {"prompt": self.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    def _structured(self, req, in_reasoning: bool):
        """The constraint a request asks for (chat's response_format, or vLLM's structured_outputs / guided_json /
        guided_regex / guided_choice on either endpoint), as a function of "still reasoning" giving the logits
        processors of one phase (engine/structured.py); None if it asks for none."""
        spec, param = self._structured_spec(req)
        if spec is None:
            return None
        if not self.client.supports_logits_processors:
            raise APIError(400, f"{param} is not supported by this engine (speculative decoding)", param=param)
        from nemotron3.engine.structured import processor_factory

        self._need_tokenizer()
        try:
            spec.validate()  # compiles the spec's automaton, which the factory reuses
        except ValueError as e:
            raise APIError(400, str(e), param=param) from None
        make = processor_factory(spec, self.tokenizer, self.client.vocab_size, self.client.eos_ids,
                                 self.think.think_end_id)  # fmt: skip
        return lambda in_span: [make(in_span)]

    @staticmethod
    def _structured_spec(req) -> tuple[StructuredOutputsParams | None, str]:
        """(the StructuredOutputsParams a request asks for, the field it came from); two different ones are a 400."""
        asked = []
        rf = getattr(req, "response_format", None)
        if rf is not None and rf.type == "json_object":
            asked.append((StructuredOutputsParams(json_object=True), "response_format"))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
            asked.append((StructuredOutputsParams(json=rf.json_schema.schema_), "response_format.json_schema.schema"))
        if req.structured_outputs is not None:
            try:
                asked.append((StructuredOutputsParams.from_value(req.structured_outputs), "structured_outputs"))
            except (ValueError, TypeError) as e:
                raise APIError(400, str(e), param="structured_outputs") from None
        extra = req.model_extra or {}
        if extra.get("guided_grammar") is not None:
            raise APIError(400, "guided_grammar (EBNF / Lark grammars) is not supported", param="guided_grammar")
        for key, name in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice")):
            if extra.get(key) is not None:
                asked.append((StructuredOutputsParams(**{name: extra[key]}), key))
        if len(asked) > 1:
            raise APIError(400, f"{asked[0][1]} and {asked[1][1]} both constrain the output: send one",
                           param=asked[1][1])  # fmt: skip
        return asked[0] if asked else (None, "")

    async def chat(self, req: ChatCompletionRequest, request: Request):
        name = self.check_model(req.model)
        prompt, reasoning, tools = self._render(req)
        prompt_ids = self._truncate(self.tokenizer.encode(prompt), req, req.max_completion_tokens or req.max_tokens)
        max_tokens = self._max_tokens(req.max_completion_tokens or req.max_tokens, len(prompt_ids), None)
        in_reasoning = reasoning.enabled and prompt_opens_thinking(prompt)
        processors = self._structured(req, in_reasoning)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        rid = new_id("chatcmpl")
        if req.use_beam_search:
            if reasoning.budget is not None:
                raise APIError(400, "a thinking budget is not supported with use_beam_search", param="thinking_budget")
            params = beam_search_params(req, max_tokens, processors is not None)
            jobs = await self._beam_jobs([prompt_ids], [params], rid, request, reasoning, in_reasoning)
        else:
            jobs = []  # the first sample prefills (and scores, for prompt_logprobs); the others copy its cache
            for i in range(req.n):
                params = self._params(req, max_tokens, logprobs, i, None if i else req.prompt_logprobs)
                jobs.append(_Job(i, prompt_ids, params, reasoning, in_reasoning, processors, fork_of=0 if i else None))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            gen = self._chat_stream(rid, name, jobs, tools, include_usage, logprobs)
            return StreamingResponse(gen, media_type="text/event-stream")
        if not req.use_beam_search:
            await self._run_all(jobs, rid, request, "/v1/chat/completions")
        choices = []
        for job in jobs:
            text = "".join(job.text)
            reasoning_text, content = parse_reasoning(text, job.in_reasoning)
            calls = []
            if tools:
                content, calls = parse_tool_calls(content, tools)
            msg = {"role": "assistant", "content": content, "reasoning_content": reasoning_text}
            if calls:
                msg["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
            lp = self._chat_logprobs(job.token_ids, job.logprobs, logprobs) if req.logprobs else None
            choice = {"index": job.index, "message": msg, "finish_reason": "tool_calls" if calls else job.finish_reason,
                      "logprobs": lp}  # fmt: skip
            choices.append(choice)
        self.metrics.request_done("/v1/chat/completions", 200)
        body = {"id": rid, "object": "chat.completion", "created": now(), "model": name, "choices": choices,
                "usage": _usage(len(prompt_ids), jobs, n=len(jobs))}  # fmt: skip
        if req.prompt_logprobs is not None:  # vLLM's field: the rendered prompt's tokens, scored
            body["prompt_logprobs"] = self._prompt_logprobs(jobs[0].prompt_logprobs, req.prompt_logprobs)
        return body

    # ------------------------------------------------------------------ running jobs
    async def _pieces(self, job: _Job, rid: str):
        inner = stream_with_budget(
            self.client, job.prompt_ids, job.params, job.reasoning, self.think, self.tokenizer,
            in_reasoning=job.in_reasoning, request_id=f"{rid}-{job.index}", processors=job.processors,
            fork_of=None if job.fork_of is None else f"{rid}-{job.fork_of}",
        )  # fmt: skip
        try:
            async for piece in inner:
                job.token_ids.extend(piece.token_ids)
                job.text.append(piece.text)
                if piece.logprobs is not None:
                    job.logprobs.extend(piece.logprobs)
                if piece.prompt_logprobs is not None:
                    job.prompt_logprobs = piece.prompt_logprobs
                job.num_cached_tokens = max(job.num_cached_tokens, piece.num_cached_tokens)
                job.reasoning_tokens = piece.reasoning_tokens
                if piece.finish_reason is not None:
                    job.finish_reason = piece.finish_reason
                yield piece
        finally:
            await inner.aclose()  # closing cancels the engine request at once

    async def _run_all(self, jobs: list[_Job], rid: str, request: Request, endpoint: str) -> None:
        """Run jobs to completion; cancel them if the client goes away. ValueError from the engine → 400."""
        start = time.monotonic()
        first: list[float] = []

        async def drain(job: _Job):
            gen = self._pieces(job, rid)
            try:
                async for piece in gen:
                    if piece.token_ids and not first:
                        first.append(time.monotonic())
            finally:
                await gen.aclose()

        async with self._together():
            task = asyncio.ensure_future(asyncio.gather(*(drain(j) for j in jobs)))
        await self._until_done(task, request)
        self._account(jobs, start, first[0] if first else None)

    async def _until_done(self, task: asyncio.Future, request: Request):
        """Await the task; cancel it with a 499 if the client goes away. ValueError from the engine → 400."""
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.cfg.disconnect_poll_s)
                if done:
                    break
                if await request.is_disconnected():
                    task.cancel()
                    self.metrics.aborted += 1
                    raise APIError(499, "client disconnected")
            return task.result()
        except ValueError as e:
            raise APIError(400, str(e)) from None
        finally:
            if not task.done():
                task.cancel()

    async def _beam_jobs(
        self, prompts: list[list[int]], params: list[BeamSearchParams], rid: str, request: Request,
        reasoning: ReasoningConfig, in_reasoning: bool,
    ) -> list[_Job]:  # fmt: skip
        """Run one beam search per prompt (use_beam_search) to the end; each prompt's n beams, best first, as
        finished jobs (what the response builders read), prompt by prompt."""
        start = time.monotonic()

        async def one(i: int, ids: list[int], p: BeamSearchParams):
            final = None
            async for final in self.client.generate(ids, p, f"{rid}-{i}"):
                pass
            return final

        outs = await self._until_done(asyncio.ensure_future(asyncio.gather(
            *(one(i, ids, p) for i, (ids, p) in enumerate(zip(prompts, params)))
        )), request)  # fmt: skip
        jobs = []
        for p_index, (ids, p, out) in enumerate(zip(prompts, params, outs)):
            for c in out.outputs:
                jobs.append(_Job(p_index * p.beam_width + c.index, ids, p, reasoning, in_reasoning,
                                 token_ids=c.token_ids, text=[c.text], logprobs=c.logprobs, finish_reason=c.finish_reason,
                                 reasoning_tokens=count_reasoning_tokens(c.token_ids, in_reasoning, self.think.think_end_id),
                                 num_cached_tokens=out.num_cached_tokens))  # fmt: skip
        self.metrics.tokens(sum(map(len, prompts)), sum(len(j.token_ids) for j in jobs),
                            sum(j.reasoning_tokens for j in jobs))  # fmt: skip
        self.metrics.observe_e2e(time.monotonic() - start)
        return jobs

    def _account(self, jobs: list[_Job], start: float, first: float | None) -> None:
        end = time.monotonic()
        n_tok = sum(len(j.token_ids) for j in jobs)
        self.metrics.tokens(len(jobs[0].prompt_ids) if jobs else 0, n_tok, sum(j.reasoning_tokens for j in jobs))
        if first is not None:
            self.metrics.observe_ttft(first - start)
            per_seq = max(len(j.token_ids) for j in jobs) if jobs else 0
            if per_seq > 1:
                self.metrics.observe_itl((end - first) / (per_seq - 1))
        self.metrics.observe_e2e(end - start)

    @contextlib.asynccontextmanager
    async def _together(self):
        """Start jobs inside: the engine waits while every started job adds its request (one event-loop turn each), so
        a prompt's samples enter the same step and the later ones copy the first one's prefill (_Job.fork_of)."""
        hold = getattr(self.client, "holding", None)
        with hold() if hold is not None else contextlib.nullcontext():
            yield
            await asyncio.sleep(0)

    async def _merged(self, jobs: list[_Job], rid: str):
        """(job, piece) from all jobs as they come; (job, None) when a job ends; cancels all on exit."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(job: _Job):
            gen = self._pieces(job, rid)
            try:
                async for piece in gen:
                    await queue.put((job, piece))
                await queue.put((job, None))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - re-raised by the consumer
                await queue.put((job, e))
            finally:
                await gen.aclose()

        async with self._together():
            tasks = [asyncio.ensure_future(pump(j)) for j in jobs]
        left = len(jobs)
        try:
            while left:
                job, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    left -= 1
                yield job, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _chat_stream(self, rid, name, jobs, tools, include_usage: bool, top_logprobs: int | None):
        created, start = now(), time.monotonic()
        first = None
        last = None
        finished = False
        rparsers = {j.index: ReasoningStreamParser(j.in_reasoning) for j in jobs}
        tparsers = {j.index: ToolCallStreamParser(tools) for j in jobs} if tools else {}

        def chunk(index, delta, finish=None, logprobs=None):
            c = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                         "choices": [c]})  # fmt: skip

        def deltas(job, reasoning, content):
            out = []
            if reasoning:
                out.append({"reasoning_content": reasoning})
            if content and job.index in tparsers:
                content, calls = tparsers[job.index].feed(content)
                if calls:
                    out.append({"content": content} if content else None)
                    out.append({"tool_calls": calls})
                    content = ""
            if content:
                out.append({"content": content})
            return [d for d in out if d]

        try:
            for job in jobs:
                yield chunk(job.index, {"role": "assistant", "content": ""})
            async for job, piece in self._merged(jobs, rid):
                t = time.monotonic()
                if piece is None:  # the job ended: flush what the parsers held back, then its finish chunk
                    r, c = rparsers[job.index].finish()
                    out = deltas(job, r, c)
                    if job.index in tparsers:
                        c2, calls = tparsers[job.index].finish()
                        out += [
                            d for d in ({"content": c2} if c2 else None, {"tool_calls": calls} if calls else None) if d
                        ]
                    for d in out:
                        yield chunk(job.index, d)
                    called = job.index in tparsers and tparsers[job.index].num_calls > 0
                    yield chunk(job.index, {}, "tool_calls" if called else job.finish_reason)
                    continue
                if piece.token_ids:
                    if first is None:
                        first = t
                        self.metrics.observe_ttft(t - start)
                    elif last is not None:
                        self.metrics.observe_itl((t - last) / len(piece.token_ids))
                    last = t
                r, c = rparsers[job.index].feed(piece.text)
                out = deltas(job, r, c)
                lp = None
                if top_logprobs is not None:
                    lp = self._chat_logprobs(piece.token_ids, piece.logprobs, top_logprobs)
                if lp and not out:
                    out = [{}]
                for k, d in enumerate(out):
                    yield chunk(job.index, d, logprobs=lp if k == 0 else None)
            if include_usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                            "choices": [], "usage": _usage(len(jobs[0].prompt_ids), jobs, n=len(jobs))})  # fmt: skip
            yield "data: [DONE]\n\n"
            finished = True
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.aborted += 1
            raise
        except Exception as e:  # noqa: BLE001 - reported to the client as an SSE error event
            yield _sse(
                error_body(str(e), "invalid_request_error" if isinstance(e, ValueError) else "internal_server_error")
            )
            yield "data: [DONE]\n\n"
        finally:
            self._account(jobs, start, first)
            self.metrics.request_done("/v1/chat/completions", 200 if finished else "aborted")

    # ------------------------------------------------------------------ logprobs
    def _token_str(self, tid: int) -> str:
        s = self._token_text.get(tid)
        if s is None:
            s = self.tokenizer.decode([tid], skip_special_tokens=False) if self.tokenizer is not None else str(tid)
            self._token_text[tid] = s
        return s

    @staticmethod
    def _top(entry: dict | None, k: int) -> list:
        """The (token id, Logprob) pairs of an entry's k most likely tokens, most likely first (the entry also holds
        the token itself, which may rank below k)."""
        return sorted(((t, v) for t, v in (entry or {}).items() if v.rank is not None and v.rank <= k),
                      key=lambda x: x[1].rank)  # fmt: skip

    def _prompt_logprobs(self, entries: list | None, k: int) -> list | None:
        """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token_id: {logprob, rank, decoded_token}},
        the prompt token first, then the k most likely (the engine may have scored more, for an echo)."""
        if entries is None:
            return None
        out: list[dict | None] = [None]
        for e in entries[1:]:
            own = next(iter(e.items()))  # the engine's entries start with the prompt token itself
            out.append({t: {"logprob": _finite(v.logprob), "rank": v.rank, "decoded_token": self._token_str(t)}
                        for t, v in [own, *self._top(e, k)]})  # fmt: skip
        return out

    def _chat_logprobs(self, token_ids: list[int], entries: list | None, k: int) -> dict | None:
        if entries is None:
            return None
        content = []
        for tid, entry in zip(token_ids, entries):
            tok = self._token_str(tid)
            lp = entry.get(tid).logprob if entry and tid in entry else 0.0
            tops = self._top(entry, k)
            content.append({"token": tok, "logprob": _finite(lp), "bytes": list(tok.encode()),
                            "top_logprobs": [{"token": self._token_str(t), "logprob": _finite(v.logprob),
                                              "bytes": list(self._token_str(t).encode())} for t, v in tops]})  # fmt: skip
        return {"content": content}

    def _completion_logprobs(self, token_ids, entries, offset: int, k: int) -> dict:
        """The legacy completions `logprobs` object for token_ids, whose text starts at `offset`; k top tokens."""
        tokens, lps, tops, offsets = [], [], [], []
        pos = offset
        for tid, entry in zip(token_ids, entries or []):
            tok = self._token_str(tid)
            tokens.append(tok)
            lps.append(_finite(entry.get(tid).logprob) if entry and tid in entry else 0.0)
            tops.append({self._token_str(t): _finite(v.logprob) for t, v in self._top(entry, k)} or None)
            offsets.append(pos)
            pos += len(tok)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    # ------------------------------------------------------------------ completions
    def _completion_prompts(self, req: CompletionRequest) -> list[tuple[str, list[int]]]:
        """(text, token ids) of each prompt of a completions request, truncated as it asks."""
        prompt = req.prompt
        if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                self._need_tokenizer()
                ids = self.tokenizer.encode(p)
                text = p
            else:
                ids = list(p)
                text = None
            cut = self._truncate(ids, req, req.max_tokens)
            if text is None or len(cut) < len(ids):  # an echo repeats the prompt the model saw
                text = self.tokenizer.decode(cut) if self.tokenizer is not None else ""
            self._check_ids(cut, "prompt")
            out.append((text, cut))
        return out

    def _truncate(self, ids: list[int], req, max_tokens: int | None) -> list[int]:
        """vLLM's truncate_prompt_tokens: the prompt's last k tokens; -1 keeps what leaves room for max_tokens."""
        keep = req.truncate_prompt_tokens
        if keep is not None and keep < 1 and keep != -1:
            raise APIError(400, f"truncate_prompt_tokens must be -1 or >= 1, got {keep}",
                           param="truncate_prompt_tokens")  # fmt: skip
        return truncate_prompt(ids, keep, max_tokens, self.client.max_model_len)

    async def completion(self, req: CompletionRequest, request: Request):
        name = self.check_model(req.model)
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of")
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        prompts = self._completion_prompts(req)
        scored = req.prompt_logprobs  # an echo with logprobs scores the echoed prompt, as OpenAI's legacy API does
        if req.echo and req.logprobs is not None:
            scored = max(req.logprobs, scored or 0)
        processors = self._structured(req, in_reasoning=False)
        rid = new_id("cmpl")
        if req.use_beam_search:
            if req.echo and req.logprobs is not None:
                raise APIError(400, "echo with logprobs is not supported with use_beam_search", param="echo")
            params = [beam_search_params(req, self._max_tokens(req.max_tokens, len(ids), 16), processors is not None)
                      for _, ids in prompts]  # fmt: skip
            jobs = await self._beam_jobs([ids for _, ids in prompts], params, rid, request, ReasoningConfig(False), False)
            texts = [prompts[job.index // req.n][0] for job in jobs]  # each beam's own prompt (echo)
        else:
            jobs, texts = [], []
            for p_index, (text, ids) in enumerate(prompts):
                max_tokens = self._max_tokens(req.max_tokens, len(ids), 16)
                for i in range(req.n):
                    params = self._params(req, max_tokens, req.logprobs, i, scored)
                    first = p_index * req.n  # the prompt's first sample: the others copy its prefill, unless each scores
                    fork_of = first if i and scored is None else None
                    jobs.append(_Job(first + i, ids, params, ReasoningConfig(False), False, processors, fork_of=fork_of))
                    texts.append(text)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._completion_stream(rid, name, jobs, texts, req, include_usage),
                                     media_type="text/event-stream")  # fmt: skip
        if not req.use_beam_search:
            await self._run_all(jobs, rid, request, "/v1/completions")
        choices = []
        for job, ptext in zip(jobs, texts):
            text = "".join(job.text)
            lp = None
            if req.logprobs is not None:
                lp = self._completion_logprobs(job.token_ids, job.logprobs, len(ptext) if req.echo else 0, req.logprobs)
                if req.echo:
                    lp = _joined(self._echo_logprobs(job, req.logprobs), lp)
            choice = {"index": job.index, "text": (ptext + text) if req.echo else text, "logprobs": lp,
                      "finish_reason": job.finish_reason}  # fmt: skip
            if req.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self._prompt_logprobs(job.prompt_logprobs, req.prompt_logprobs)
            choices.append(choice)
        self.metrics.request_done("/v1/completions", 200)
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        return {"id": rid, "object": "text_completion", "created": now(), "model": name, "choices": choices,
                "usage": _usage(prompt_tokens, jobs, reasoning=False, n=req.n)}  # fmt: skip

    def _echo_logprobs(self, job: _Job, k: int) -> dict:
        """The echoed prompt's part of a completion's `logprobs`: null for its first token, which nothing predicts
        (and for all, should the request have ended before its prompt was scored)."""
        entries = job.prompt_logprobs or [None] * len(job.prompt_ids)
        lp = self._completion_logprobs(job.prompt_ids, entries, 0, k)
        lp["token_logprobs"] = [None] + lp["token_logprobs"][1:] if job.prompt_logprobs else [None] * len(entries)
        return lp

    async def _completion_stream(self, rid, name, jobs, texts, req: CompletionRequest, include_usage: bool):
        created, start = now(), time.monotonic()
        first = last = None
        finished = False
        offsets = {j.index: 0 for j in jobs}

        def chunk(index, text, finish=None, logprobs=None):
            c = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            return _sse({"id": rid, "object": "text_completion", "created": created, "model": name, "choices": [c]})

        echoes = dict(zip((j.index for j in jobs), texts)) if req.echo else {}
        try:
            if req.echo and req.logprobs is None:
                for job, ptext in zip(jobs, texts):
                    offsets[job.index] = len(ptext)
                    yield chunk(job.index, echoes.pop(job.index))
            async for job, piece in self._merged(jobs, rid):
                if job.index in echoes:  # echo with logprobs: the prompt's text goes out with its scores
                    offsets[job.index] = len(echoes[job.index])
                    yield chunk(job.index, echoes.pop(job.index), logprobs=self._echo_logprobs(job, req.logprobs))
                if piece is None:
                    yield chunk(job.index, "", job.finish_reason)
                    continue
                t = time.monotonic()
                if piece.token_ids:
                    if first is None:
                        first = t
                        self.metrics.observe_ttft(t - start)
                    elif last is not None:
                        self.metrics.observe_itl((t - last) / len(piece.token_ids))
                    last = t
                lp = None
                if req.logprobs is not None:
                    lp = self._completion_logprobs(piece.token_ids, piece.logprobs, offsets[job.index], req.logprobs)
                offsets[job.index] += len(piece.text)
                if piece.text or lp:
                    yield chunk(job.index, piece.text, logprobs=lp)
            if include_usage:
                prompt_tokens = sum(len(j.prompt_ids) for j in jobs) // max(req.n, 1)
                yield _sse({"id": rid, "object": "text_completion", "created": created, "model": name, "choices": [],
                            "usage": _usage(prompt_tokens, jobs, reasoning=False, n=req.n)})  # fmt: skip
            yield "data: [DONE]\n\n"
            finished = True
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.aborted += 1
            raise
        except Exception as e:  # noqa: BLE001 - reported to the client as an SSE error event
            yield _sse(
                error_body(str(e), "invalid_request_error" if isinstance(e, ValueError) else "internal_server_error")
            )
            yield "data: [DONE]\n\n"
        finally:
            self._account(jobs, start, first)
            self.metrics.request_done("/v1/completions", 200 if finished else "aborted")


# ------------------------------------------------------------------------------------------ helpers


def _message_dict(m, i: int) -> dict:
    """An OpenAI message as the chat template wants it (text content, tool-call arguments as mappings)."""
    d = {"role": "system" if m.role == "developer" else m.role}
    content = m.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") not in ("text", "input_text") or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param=f"messages.{i}")
            texts.append(part["text"])
        content = "".join(texts)
    d["content"] = content if content is not None else ""
    if m.reasoning_content is not None:
        d["reasoning_content"] = m.reasoning_content
    if m.name is not None:
        d["name"] = m.name
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        calls = []
        for j, call in enumerate(m.tool_calls):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise APIError(400, f"messages[{i}].tool_calls[{j}] needs function.name", param=f"messages.{i}")
            args = fn.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except ValueError:
                    raise APIError(400, f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON",
                                   param=f"messages.{i}") from None  # fmt: skip
            if not isinstance(args, dict):
                raise APIError(400, f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object",
                               param=f"messages.{i}")  # fmt: skip
            calls.append(
                {"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}
            )
        d["tool_calls"] = calls
    return d


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nemotron3")
    except PackageNotFoundError:  # a source tree that is not installed
        return "unknown"


def _usage(prompt_tokens: int, jobs: list[_Job], reasoning: bool = True, n: int = 1) -> dict:
    """OpenAI's usage object; jobs holds n samples per prompt, prompt by prompt (prompt tokens count once). With
    prefix caching, prompt_tokens_details.cached_tokens counts the prompt tokens found in the cache."""
    completion = sum(len(j.token_ids) for j in jobs)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": sum(j.num_cached_tokens for j in jobs[:: max(n, 1)])},
    }
    if reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": sum(j.reasoning_tokens for j in jobs)}
    return usage


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias (token ids as JSON keys, biases in [-100, 100]) as SamplingParams wants it."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not key.strip().isdigit():
            raise APIError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")
        if not -100.0 <= value <= 100.0:
            raise APIError(400, f"logit_bias values must be in [-100, 100], got {value} for token {key}",
                           param="logit_bias")  # fmt: skip
        out[int(key)] = float(value)
    return out


def _joined(a: dict, b: dict) -> dict:
    """Two legacy `logprobs` objects (echoed prompt, then completion) as one."""
    return {key: a[key] + b[key] for key in a}


def _finite(x: float) -> float:
    return x if x > -1e30 else -9999.0


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ------------------------------------------------------------------------------------------ running


def build_client(model: str = "default", **llm_options) -> EngineClient:
    """Load a model with `LLM(model, **llm_options)` and start its engine loop (AsyncLLM)."""
    from nemotron3.engine.async_llm import AsyncLLM
    from nemotron3.engine.llm import LLM

    llm = LLM(model, **llm_options)
    return EngineClient(AsyncLLM(llm.engine))


class ServerThread:
    """Run an app with uvicorn on a background thread (tests, benchmarks): `with ServerThread(app) as url:`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
        self.thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> str:
        import threading

        self.thread = threading.Thread(target=self.server.run, name="nemotron3-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(
    model: str = "default",
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: list[str] | None = None,
    api_key: str | None = None,
    cors_origins: list[str] | None = None,
    log_level: str = "info",
    **llm_options,
) -> None:
    """Load the model and serve it until interrupted (`nemotron3 serve`)."""
    import uvicorn

    client = build_client(model, **llm_options)
    names = served_model_name or [model]
    app = create_app(client, ServeConfig(model_names=names, api_key=api_key, cors_origins=cors_origins))
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        client.shutdown()
