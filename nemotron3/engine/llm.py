"""LLM: the offline API with vLLM's names — `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from rich.progress import Progress

from nemotron3.engine.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from nemotron3.engine.engine import EngineConfig, LLMEngine
from nemotron3.engine.outputs import CompletionOutput, RequestOutput
from nemotron3.engine.sampling_params import SamplingParams
from nemotron3.io.tokenizer import Tokenizer
from nemotron3.model.nemotron import NemotronHForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": torch.float32}


class LLM:
    """Generate with a Nemotron-H model: continuous batching, chunked prefill and a paged hybrid cache.

    model: a checkpoint directory, a preset name, or an already built NemotronHForCausalLM.
    Engine options (vLLM's names): max_model_len, max_num_seqs, max_num_batched_tokens,
    enable_chunked_prefill, block_size, kv_cache_memory_bytes; weight_dtype="bfloat16" stores a float32 model's
    matrices in bf16 (weight-only: activations, K/V and states stay float32; decode reads half the bytes);
    kv_cache_dtype="bfloat16" stores K/V in bf16 (twice the tokens per budget); enable_prefix_caching=True keeps
    finished requests' blocks and some Mamba states for prompts that start alike (prefix_cache_states: how many
    states; engine/prefix_cache.py); matmul_precision="high" or
    "medium" (torch.set_float32_matmul_precision's names) runs prefill GEMMs on AMX tiles where the CPU has them;
    without AMX, "medium" runs them on AVX512-BF16 dot products where the CPU has those.
    speculative_config: {"method": "mtp" (or "nemotron_h_mtp"), "num_speculative_tokens": k} drafts k
    tokens per step with the model's MTP block and verifies them losslessly (docs/speculative.md).
    """

    def __init__(
        self,
        model: str | os.PathLike | NemotronHForCausalLM,
        *,
        tokenizer: str | os.PathLike | Tokenizer | None = None,
        dtype: str | torch.dtype = "float32",
        device: str = "cpu",
        dt_clamp: str | None = None,
        speculative_config: dict | None = None,
        seed: int = 0,
        **engine_options,
    ) -> None:
        spec = None
        if speculative_config is not None:  # checked before the model loads: a bad config fails fast
            from nemotron3.engine.speculative import SpeculativeConfig

            spec = SpeculativeConfig.from_dict(speculative_config)
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
            dtype = DTYPES[dtype]
        known = set(EngineConfig.__dataclass_fields__)
        unknown = sorted(set(engine_options) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
        torch.manual_seed(seed)
        if isinstance(model, NemotronHForCausalLM):
            self.model = model
        else:
            from nemotron3.default_model import resolve_model
            from nemotron3.loader import load_model

            model = resolve_model(model)
            self.model = load_model(model, dtype=dtype, device=device, dt_clamp=dt_clamp)
        if tokenizer is None and not isinstance(model, NemotronHForCausalLM) and (Path(model) / "tokenizer.json").is_file():
            tokenizer = model
        if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer.from_dir(tokenizer)
        if spec is None:
            self.engine = LLMEngine(self.model, tokenizer, EngineConfig(**engine_options))
        else:
            from nemotron3.engine.speculative import SpeculativeEngine

            self.engine = SpeculativeEngine(self.model, tokenizer, EngineConfig(**engine_options), spec)
        self._ids = itertools.count()

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache's blocks and states that no running request holds (vLLM's name); True if none is
        left (always, between generate calls)."""
        return self.engine.reset_prefix_cache()

    def get_tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | dict | list,
        sampling_params: SamplingParams | BeamSearchParams | list | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        prompts: a string, {"prompt_token_ids": [...]}, or a list of either (a list of ints alone is
        one tokenized prompt, as vLLM's TokensPrompt). BeamSearchParams run a beam search whose beams are the
        prompt's outputs, best first (beam_search returns them in vLLM's BeamSearchOutput form instead).
        """
        prompts = _prompt_list(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: got {len(params)} for {len(prompts)} prompts")
        return self._run(prompts, params, use_tqdm, "generating")

    def beam_search(
        self, prompts: str | dict | list, params: BeamSearchParams, use_tqdm: bool = False
    ) -> list[BeamSearchOutput]:
        """vLLM's beam search: for each prompt, the params.beam_width most likely continuations (by cumulative
        logprob / length ** length_penalty), best first. `tokens` and `text` of each sequence hold the prompt and
        the continuation. The beams of all prompts decode together, batched like any requests; prompts as in
        generate. See engine/beam_search.py."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be BeamSearchParams, got {type(params).__name__}")
        prompts = _prompt_list(prompts)
        tok = self.get_tokenizer()
        results = []
        for out in self._run(prompts, [params] * len(prompts), use_tqdm, "beam search"):
            sequences = []
            for c in out.outputs:
                tokens = out.prompt_token_ids + c.token_ids
                text = tok.decode(tokens) if tok is not None else None
                sequences.append(BeamSearchSequence(tokens, c.logprobs, c.cumulative_logprob, text, c.finish_reason,
                                                    c.stop_reason))  # fmt: skip
            results.append(BeamSearchOutput(sequences))
        return results

    def _run(self, prompts: list, params: list, use_tqdm: bool, what: str) -> list[RequestOutput]:
        """Queue every prompt with its params and step the engine until all finish; outputs in prompt order. A
        prompt the engine refuses aborts the ones queued before it."""
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                rid = str(next(self._ids))
                self.engine.add_request(rid, prompt, p)
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        final: dict[str, RequestOutput] = {}
        with Progress(disable=not use_tqdm, transient=True) as bar:
            task = bar.add_task(what, total=len(ids))
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
                        bar.advance(task)
        return [final[rid] for rid in ids]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """vLLM's offline chat: render each conversation with the tokenizer's chat template (or `chat_template`) and
        generate. messages: one conversation (a list of {"role", "content"} dicts) or a list of them; outputs
        come back in order, each with the rendered text as `.prompt`. chat_template_kwargs go to the template,
        e.g. {"enable_thinking": False} for Nemotron's reasoning-off mode; for a thinking budget, and the reply
        split into reasoning and content, see nemotron3.engine.reasoning.chat."""
        tok = self.get_tokenizer()
        if tok is None:
            raise ValueError("chat needs a model with a tokenizer (tokenizer.json); generate takes token ids")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        if not conversations or not all(isinstance(c, list) and c for c in conversations):
            raise ValueError("messages must be a non-empty conversation (a list of message dicts) or a list of them")
        for c in conversations:
            bad = [m for m in c if not isinstance(m, dict) or "role" not in m]
            if bad:
                raise ValueError(f"messages: every message must be a dict with a 'role', got {bad[0]!r}")
        options = dict(
            tools=tools, add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            chat_template=chat_template, **(chat_template_kwargs or {}),
        )  # fmt: skip
        return self.generate([tok.apply_chat_template(c, **options) for c in conversations], sampling_params, use_tqdm)

    def stream(self, prompt: str | dict | list[int], sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield one RequestOutput per step with only the new tokens/text of each sample (deltas).

        Closing the iterator early (break, or `.close()`) cancels the request and frees its cache.
        Other requests already queued in the engine keep running alongside.
        """
        rid = str(next(self._ids))
        self.engine.add_request(rid, prompt, sampling_params)
        sent: dict[int, tuple[int, int]] = {}
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    finished = out.finished
                    yield _delta(out, sent)
        finally:
            if not finished:
                self.engine.abort(rid)


def _prompt_list(prompts: str | dict | list) -> list:
    """generate's prompt forms as a list: a string, a dict or a list of ints alone is one prompt (vLLM's
    TextPrompt / TokensPrompt)."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


def _delta(out: RequestOutput, sent: dict[int, tuple[int, int]]) -> RequestOutput:
    """The part of each sample not yet sent: new token ids and new text; and the prompt logprobs, once, in the first
    delta where they are complete (`sent[-1]` marks them sent)."""
    lps = out.prompt_logprobs
    send_prompt = lps is not None and len(lps) == len(out.prompt_token_ids) and -1 not in sent
    if send_prompt:
        sent[-1] = (0, 0)
    deltas = []
    for c in out.outputs:
        n_tok, n_txt = sent.get(c.index, (0, 0))
        deltas.append(
            CompletionOutput(
                c.index, c.text[n_txt:], c.token_ids[n_tok:], c.cumulative_logprob,
                c.logprobs[n_tok:] if c.logprobs is not None else None, c.finish_reason, c.stop_reason,
            )  # fmt: skip
        )
        sent[c.index] = (len(c.token_ids), len(c.text))
    return RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, deltas, out.finished, out.metrics,
                         prompt_logprobs=lps if send_prompt else None,
                         num_cached_tokens=out.num_cached_tokens)  # fmt: skip
