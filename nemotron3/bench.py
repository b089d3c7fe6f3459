"""Measure our engine's throughput: prefill tok/s, and decode tok/s and ms/step per batch size.

    nemotron3 bench MODEL [--batch 1 8 32] [--prompt-len 512] [--max-tokens 64] [--json]

MODEL is a checkpoint directory or a preset (random weights). Every number comes from `LLM.generate`
as a user runs it (scheduler + model + sampler), greedy, on random prompt token ids:

* prefill: one request of `prompt_len` tokens with max_tokens=1, the token budget ≥ the prompt (one
  engine step), timed end to end; median of `reps` after one warm-up.
* decode, per batch size N: N requests of `prompt_len` tokens run together; the wall time of each engine
  step is logged with what it held. ms/step is the median over the steps in which all N sequences decode
  (no prefill work; the first two such steps dropped), and decode tok/s = N / that median.

benchmarks/bench_engine.py compares the same measurements against transformers (research/perf.md).
This module has no dependency beyond the package; the timing helpers are shared with that script.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from nemotron3.config import ModelConfig

DEFAULT_BATCHES = (1, 8, 32)
PREFILL_BUDGET = 4096  # token budget per step while N prompts are prefilled together


@dataclass
class StepRecord:
    seconds: float  # wall time of LLMEngine.step()
    decodes: int  # sequences that fed one generated token
    prefill_tokens: int  # prompt tokens fed


@dataclass
class TimedRun:
    outputs: list
    steps: list[StepRecord]
    wall_s: float
    distinct_experts: float | None = None  # mean distinct routed experts per MoE layer over decode steps
    extra: dict = field(default_factory=dict)

    def decode_steps(self, batch: int | None = None) -> list[StepRecord]:
        """Steps with no prefill work; with `batch`, only those where all `batch` sequences decoded."""
        return [s for s in self.steps if s.prefill_tokens == 0 and s.decodes and (batch is None or s.decodes == batch)]

    @property
    def prefill_s(self) -> float:
        return sum(s.seconds for s in self.steps if s.prefill_tokens)


def greedy(max_tokens: int):
    from nemotron3.engine.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def timed_generate(llm, prompts: list[list[int]], max_tokens: int, count_experts: bool = False) -> TimedRun:
    """`llm.generate` of token-id prompts (greedy, never stopping early), logging every engine step.

    The engine's `step` and its runner's `step` are wrapped on the instance for the call only; the
    wrappers cost a few µs per step. With count_experts, a forward hook on every MoE router keeps the
    chosen expert ids, and the mean number of distinct experts per layer over the pure decode steps is
    reported (what a decode step really reads of the routed experts).
    """
    from nemotron3.model.moe import Router

    eng = llm.engine
    steps: list[StepRecord] = []
    comp: dict[str, int] = {}
    routed: list[list[torch.Tensor]] = []
    run_step, eng_step = eng.runner.step, eng.step

    def runner_step(segments):
        comp["dec"] = sum(1 for s in segments if s.decode)
        comp["pre"] = sum(len(s.tokens) for s in segments if not s.decode)
        if count_experts:
            routed.append([])
        return run_step(segments)

    def engine_step():
        t0 = time.perf_counter()
        out = eng_step()
        steps.append(StepRecord(time.perf_counter() - t0, comp.pop("dec", 0), comp.pop("pre", 0)))
        return out

    hooks = []
    if count_experts:
        for m in llm.model.modules():
            if isinstance(m, Router):
                hooks.append(m.register_forward_hook(lambda mod, inp, out: routed[-1].append(out[1])))
    eng.runner.step, eng.step = runner_step, engine_step
    try:
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], greedy(max_tokens))
        wall = time.perf_counter() - t0
    finally:
        del eng.runner.step, eng.step
        for h in hooks:
            h.remove()
    experts = None
    if count_experts:
        per_step = [
            sum(int(idx.unique().numel()) for idx in layers) / len(layers)
            for s, layers in zip(steps, routed)
            if s.prefill_tokens == 0 and layers
        ]
        experts = statistics.fmean(per_step) if per_step else None
    return TimedRun(outs, steps, wall, experts)


def cache_bytes(
    config: ModelConfig, n_seqs: int, tokens_per_seq: int, dtype: torch.dtype = torch.float32,
    kv_dtype: torch.dtype | None = None, block_size: int = 16,
) -> int:  # fmt: skip
    """A kv_cache_memory_bytes that holds n_seqs sequences of tokens_per_seq tokens (dtype: the activations';
    kv_dtype: the K/V pools', default dtype), by the cache's own accounting (engine/cache.py: pool_bytes).

    The engine allocates (and zeroes) its pools up front, so sizing them to the run keeps the memory
    and peak RSS to what the run needs.
    """
    from nemotron3.engine.cache import pool_bytes

    slot, block = pool_bytes(config, dtype, kv_dtype, block_size)
    blocks = n_seqs * (-(-tokens_per_seq // block_size) + 2)
    return n_seqs * slot + blocks * block + 4096


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    low = min(3, vocab - 1)
    return torch.randint(low, vocab, (n, length), generator=g).tolist()


def _median(xs):
    return statistics.median(xs) if xs else None


def make_llm(model, n_seqs: int, tokens_per_seq: int, budget: int, options: dict | None = None):
    """An LLM over `model` (a built NemotronHForCausalLM) with pools sized for the run. `options`: further
    engine options (kv_cache_dtype, weight_dtype: EngineConfig), passed on as they are."""
    from nemotron3.engine.engine import KV_CACHE_DTYPES
    from nemotron3.engine.llm import LLM

    options = options or {}
    kv_dtype = KV_CACHE_DTYPES.get(options.get("kv_cache_dtype", "auto")) or model.dtype  # unknown: LLM says so
    opts = {
        "max_num_seqs": n_seqs,
        "max_num_batched_tokens": budget,
        "kv_cache_memory_bytes": cache_bytes(model.config, n_seqs, tokens_per_seq, model.dtype, kv_dtype),
        **options,
    }
    return LLM(model, **opts), opts


def bench_prefill(model, prompt_len: int, reps: int = 3, seed: int = 0, options: dict | None = None) -> dict:
    """Batch-1 prefill: LLM.generate(max_tokens=1) with the whole prompt in one step; warm-up + reps."""
    llm, opts = make_llm(model, 1, prompt_len + 2, max(prompt_len, 16), options)
    prompts = random_prompts(reps + 1, prompt_len, model.config.vocab_size, seed)
    times = []
    for p in prompts:
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": p}], greedy(1))
        times.append(time.perf_counter() - t0)
    med = _median(times[1:])
    return {"prompt_len": prompt_len, "times_s": times[1:], "warmup_s": times[0], "median_s": med,
            "tok_s": prompt_len / med, "engine_options": opts}  # fmt: skip


def bench_decode(
    model, batch: int, prompt_len: int, max_tokens: int, seed: int = 0, count_experts: bool = False,
    options: dict | None = None,
) -> dict:  # fmt: skip
    """`batch` requests decoding together after `prompt_len`-token prompts: ms/step and tok/s."""
    budget = max(prompt_len, PREFILL_BUDGET)
    llm, opts = make_llm(model, batch, prompt_len + max_tokens + 1, budget, options)
    vocab = model.config.vocab_size
    llm.generate([{"prompt_token_ids": p} for p in random_prompts(1, min(32, prompt_len), vocab, seed + 7)], greedy(2))
    run = timed_generate(llm, random_prompts(batch, prompt_len, vocab, seed), max_tokens, count_experts)
    full = run.decode_steps(batch)
    steps = full[2:] if len(full) > 4 else full  # the first decode steps still warm caches up
    if steps:
        ms = _median([s.seconds for s in steps]) * 1e3
        tok_s = batch / ms * 1e3
    else:  # too few tokens for every sequence to decode together: all pure decode steps, averaged
        dec = run.decode_steps()
        secs = sum(s.seconds for s in dec)
        ms = _median([s.seconds for s in dec]) * 1e3 if dec else None
        tok_s = sum(s.decodes for s in dec) / secs if secs else None
    generated = sum(len(o.outputs[0].token_ids) for o in run.outputs)
    return {
        "batch": batch, "prompt_len": prompt_len, "max_tokens": max_tokens,
        "median_ms_per_step": ms, "decode_tok_s": tok_s, "full_batch_steps": len(full),
        "e2e_tok_s": generated / run.wall_s, "wall_s": run.wall_s, "prefill_s": run.prefill_s,
        "step_ms": [s.seconds * 1e3 for s in run.steps], "step_decodes": [s.decodes for s in run.steps],
        "step_prefill_tokens": [s.prefill_tokens for s in run.steps], "distinct_experts": run.distinct_experts,
        "engine_options": opts,
    }  # fmt: skip


def run_bench(
    model, batches=DEFAULT_BATCHES, prompt_len: int = 512, max_tokens: int = 64, reps: int = 3, seed: int = 0,
    progress=None, options: dict | None = None,
) -> dict:  # fmt: skip
    """Prefill at prompt_len, then decode at each batch size; returns a JSON-able dict. `options`: further
    engine options for every LLM of the run (make_llm)."""
    say = progress or (lambda msg: None)
    torch.manual_seed(seed)
    say(f"prefill {prompt_len} tokens")
    prefill = bench_prefill(model, prompt_len, reps, seed, options)
    decode = []
    for b in batches:
        say(f"decode batch {b}")
        decode.append(bench_decode(model, b, prompt_len, max_tokens, seed, options=options))
    return {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": str(model.dtype).replace("torch.", ""),
        "weight_dtype": str(model.lm_head.weight.dtype).replace("torch.", ""),
        "kv_cache_dtype": (options or {}).get("kv_cache_dtype", "auto"),
        "enforce_eager": bool((options or {}).get("enforce_eager", False)),
        "matmul_precision": (options or {}).get("matmul_precision", "highest"),
        "pattern": model.config.hybrid_override_pattern, "params": sum(p.numel() for p in model.parameters()),
        "prefill": prefill, "decode": decode,
    }  # fmt: skip


def build_model(spec: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(name, model) through the package loader: a checkpoint directory, or a preset (or a unique preset
    prefix such as "nano") with seeded random weights. The loader refuses what does not fit in memory."""
    from pathlib import Path

    from nemotron3.config import PRESETS
    from nemotron3.default_model import resolve_model
    from nemotron3.loader import load_model

    name = spec = str(resolve_model(spec))
    if not Path(spec).is_dir() and spec not in PRESETS:
        names = [n for n in PRESETS if spec and n.startswith(spec)]
        if len(names) != 1:
            raise ValueError(
                f"unknown model {spec!r}: not a checkpoint directory, and presets are {', '.join(PRESETS)}"
            )
        name = names[0]
    return name, load_model(name, dtype=dtype, seed=seed)
