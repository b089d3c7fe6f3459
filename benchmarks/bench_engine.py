"""nemotron3's engine against transformers 5.23 `generate` on the same random fp32 weights, one invocation.

    .venv/bin/python benchmarks/bench_engine.py            # full run, ~15-25 min on the 2-vCPU CI machine
    .venv/bin/python benchmarks/bench_engine.py --quick    # fewer reps and contexts, ~5 min
    .venv/bin/python benchmarks/bench_engine.py --smoke    # tiny configs, 1 rep, seconds (the test uses it)

Writes benchmarks/results/engine.json (machine, versions, configs, every raw timing, medians, ratios,
targets) and engine.png (needs matplotlib: `pip install -e .[bench]`). Method (research/perf.md §2, §6):

* Every measurement runs in its own worker process (`--worker SPEC`), so the process's peak RSS is that
  scenario's (VmHWM; `ru_maxrss` is recorded too, but Linux carries it across execve from the parent).
  Ours and transformers alternate process by process (A/B/A/B, the order flipped every rep) and each cell
  is the median over reps. 2 torch threads, fp32, greedy, random prompt token ids. Before each worker the
  harness waits (up to 20 s) for other processes to go idle, and records their CPU use during the worker.
* Weights: transformers' random init under manual_seed(0), saved once to a temporary safetensors file;
  both engines load exactly those tensors.
* (a) batch-1 decode after a 512-token prompt. Ours: wall time of each engine step (`LLM.generate`,
  scheduler + model + sampler) while decoding. transformers: `generate()` with a LogitsProcessor stamping
  every step (perf.md §2). 33 new tokens; median of the 30 step times after the first 2.
  Roofline: bytes a step must read (dense weights incl. lm_head, the top-k routed experts of each MoE
  layer, K/V, SSM + conv state read and written) / 35 GB/s.
* (b) aggregate decode tok/s with N = 1, 8, 32 concurrent 512-token requests in one `LLM.generate`:
  N / median time of the steps where all N sequences decode. transformers' batch-1 figure from (a) is
  the reference; transformers batch 8 (one padded-free batch of equal prompts) is measured too.
* (c) prefill tok/s at 512 and 2048 tokens, batch 1. Ours: a request with max_tokens=1 through
  `LLM.generate`, token budget = prompt length (one step), end to end. transformers: one forward with
  `use_cache=True, logits_to_keep=1`. On CPUs with AMX, ours also runs under matmul_precision "high"
  and "medium" (prefill GEMMs as bf16 tile products, not float32: beside the targets, not for them); on
  CPUs with AVX512-BF16 but no AMX (AMD Zen 4), under "medium" (bf16 dot products).
* (d) decode ms/token vs context 512 / 2k / 8k / 32k, batch 1, for the hybrid nemo50 and its
  attention-only twin `*E*E*E*E` (each Mamba layer replaced by attention: same width, depth and MoE).
  Ours prefills with chunked prefill (2048-token budget per step). transformers is skipped where a
  runtime guard predicts it would run too long. The growth target uses a second measurement of ours:
  512 and the longest context in one process, 12 alternating blocks of 4 decode steps each
  (w_context_pair), since processes minutes apart differ by more than the effect being measured.
* (e) peak RSS of every worker process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import common as C
import torch

from nemotron3.bench import greedy, make_llm, timed_generate
from nemotron3.kernels import native

DEC_PROMPT = 512
DEC_NEW = 33  # generated tokens: 32 step intervals, the first 2 dropped
DROP = 2
CHUNK = 2048  # ours: prefill token budget per step for long prompts (d)
PAIR_BLOCK, PAIR_BLOCKS = 4, 12  # (d) one-process pair: blocks of 4 decode steps, 12 blocks per context


# ============================================================================================ workers


def _ours_llm(name: str, weights: str, n_seqs: int, tokens_per_seq: int, budget: int, spec: dict | None = None):
    """Our LLM over the saved weights, its cache pools sized for the run (nemotron3.bench.make_llm), with the
    engine options a spec names: weight_dtype "bfloat16" (weight-only bf16), enforce_eager (no decode program),
    matmul_precision (prefill GEMMs as bf16 products, kernels/cpu_amx.c)."""
    options = {k: spec[k] for k in ("weight_dtype", "enforce_eager", "matmul_precision") if (spec or {}).get(k)}
    return make_llm(C.load_ours(name, Path(weights)), n_seqs, tokens_per_seq, budget, options)


class _Stamp:
    """A transformers LogitsProcessor that records the time of every generation step."""

    def __init__(self):
        self.t: list[float] = []

    def __call__(self, input_ids, scores):
        self.t.append(time.perf_counter())
        return scores


def _hf_generate(model, prompts: list[list[int]], new: int):
    """transformers generate() (greedy, never stopping early) timed step by step (perf.md §2)."""
    from transformers import LogitsProcessorList

    ids = torch.tensor(prompts)
    stamp = _Stamp()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
            min_new_tokens=new, eos_token_id=None, pad_token_id=0, logits_processor=LogitsProcessorList([stamp]),
        )  # fmt: skip
    wall = time.perf_counter() - t0
    steps = [b - a for a, b in zip(stamp.t, stamp.t[1:])]
    prefill = stamp.t[0] - t0 if stamp.t else None
    return out[:, ids.shape[1] :].tolist(), steps, prefill, wall


def _decode_summary(step_s: list[float], batch: int) -> dict:
    kept = step_s[DROP:] if len(step_s) > DROP + 2 else step_s
    ms = C.median(kept) * 1e3 if kept else None
    return {
        "step_ms": [s * 1e3 for s in step_s],
        "median_ms": ms,
        "tok_s": batch / ms * 1e3 if ms else None,
    }


def w_decode(spec: dict) -> dict:
    """(a)/(b): `batch` concurrent requests of `prompt` tokens, DEC_NEW tokens each."""
    name, engine, batch, prompt = spec["model"], spec["engine"], spec["batch"], spec["prompt"]
    mc = C.config(name)
    prompts = [C.random_prompt(prompt, mc.vocab_size, seed=100 + i) for i in range(batch)]
    warm = [C.random_prompt(min(32, prompt), mc.vocab_size, seed=7)]
    res: dict = {}
    if engine == "ours":
        budget = max(spec.get("budget", 4096), prompt)
        prefill_steps = -(-batch * prompt // budget)
        new = DEC_NEW + prefill_steps - 1  # every sequence decodes together for >= DEC_NEW - 1 steps
        llm, opts = _ours_llm(name, spec["weights"], batch, prompt + new + 1, budget, spec)
        timed_generate(llm, warm, 4)
        run = timed_generate(llm, prompts, new, count_experts=spec.get("count_experts", False))
        res.update(_decode_summary([s.seconds for s in run.decode_steps(batch)], batch))
        res.update(
            engine_options=opts, steps=[[s.seconds, s.decodes, s.prefill_tokens] for s in run.steps],
            wall_s=run.wall_s, new_tokens=new, e2e_tok_s=batch * new / run.wall_s, prefill_s=run.prefill_s,
            distinct_experts=run.distinct_experts, tokens=run.outputs[0].outputs[0].token_ids[:DEC_NEW],
        )  # fmt: skip
    else:
        model = C.load_hf(name, Path(spec["weights"]))
        _hf_generate(model, warm, 4)
        toks, steps, prefill, wall = _hf_generate(model, prompts, DEC_NEW)
        res.update(_decode_summary(steps, batch))
        res.update(wall_s=wall, prefill_s=prefill, tokens=toks[0][:DEC_NEW], attn=model.config._attn_implementation)
    return res


def w_prefill(spec: dict) -> dict:
    """(c): batch-1 prefill of `prompt` tokens: one warm-up at full length, then `calls` timed calls (the plan's
    prefill_calls; their median is the cell's value)."""
    name, engine, prompt = spec["model"], spec["engine"], spec["prompt"]
    mc = C.config(name)
    calls = spec.get("calls", 5)
    prompts = [C.random_prompt(prompt, mc.vocab_size, seed=200 + i) for i in range(calls + 1)]
    times = []
    if engine == "ours":
        llm, opts = _ours_llm(name, spec["weights"], 1, prompt + 2, prompt, spec)
        for p in prompts:
            t0 = time.perf_counter()
            llm.generate([{"prompt_token_ids": p}], greedy(1))
            times.append(time.perf_counter() - t0)
        extra = {"engine_options": opts, "method": "LLM.generate(max_tokens=1), budget = prompt, end to end"}
    else:
        model = C.load_hf(name, Path(spec["weights"]))
        for p in prompts:
            ids = torch.tensor([p])
            t0 = time.perf_counter()
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
        extra = {"method": "forward(use_cache=True, logits_to_keep=1)"}
    timed = times[1:]
    med = C.median(timed)
    return {"warmup_s": times[0], "times_s": timed, "median_s": med, "tok_s": prompt / med, **extra}


def w_context(spec: dict) -> dict:
    """(d): batch-1 decode after a `prompt`-token context (ours: chunked prefill)."""
    name, engine, prompt = spec["model"], spec["engine"], spec["prompt"]
    mc = C.config(name)
    p = C.random_prompt(prompt, mc.vocab_size, seed=300)
    warm = [C.random_prompt(32, mc.vocab_size, seed=7)]
    if engine == "ours":
        llm, opts = _ours_llm(name, spec["weights"], 1, prompt + DEC_NEW + 1, CHUNK)
        timed_generate(llm, warm, 4)
        run = timed_generate(llm, [p], DEC_NEW)
        res = _decode_summary([s.seconds for s in run.decode_steps(1)], 1)
        res.update(
            engine_options=opts, prefill_s=run.prefill_s, wall_s=run.wall_s,
            prefill_steps=sum(1 for s in run.steps if s.prefill_tokens),
        )  # fmt: skip
    else:
        model = C.load_hf(name, Path(spec["weights"]))
        _hf_generate(model, warm, 4)
        _, steps, pre_s, wall = _hf_generate(model, [p], DEC_NEW)
        res = _decode_summary(steps, 1)
        res.update(prefill_s=pre_s, wall_s=wall)
    res["prefill_tok_s"] = prompt / res["prefill_s"] if res.get("prefill_s") else None
    return res


def w_context_pair(spec: dict) -> dict:
    """(d), ours: decode after a `base`-token and a `prompt`-token context in ONE process (two engines on the
    same weights), alternating blocks of PAIR_BLOCK steps, so both see the same machine state; the growth
    is the ratio of the two medians. Separate processes minutes apart differ by more than the effect."""
    from nemotron3.engine.sampling_params import SamplingParams

    name, base, long_ = spec["model"], spec["base"], spec["prompt"]
    blocks = spec.get("blocks", PAIR_BLOCKS)
    model = C.load_ours(name, Path(spec["weights"]))
    mc = model.config
    engines = {}
    t0 = time.perf_counter()
    for L in (base, long_):
        options = {"kv_cache_dtype": spec.get("kv_cache_dtype", "auto")}
        llm, _ = make_llm(model, 1, L + blocks * PAIR_BLOCK + 8, CHUNK, options)
        eng = llm.engine
        prompt = C.random_prompt(L, mc.vocab_size, seed=300)
        eng.add_request("p", prompt, SamplingParams(max_tokens=blocks * PAIR_BLOCK + 4, temperature=0, ignore_eos=True))
        while not (eng.scheduler.running and eng.scheduler.running[0].num_computed >= L):  # the prompt, chunked
            eng.step()
        eng.step()  # first decode step (not timed)
        engines[L] = eng
    setup_s = time.perf_counter() - t0
    times: dict[int, list[float]] = {base: [], long_: []}
    for b in range(blocks):
        for L in ((base, long_) if b % 2 == 0 else (long_, base)):
            for _ in range(PAIR_BLOCK):
                t1 = time.perf_counter()
                engines[L].step()
                times[L].append(time.perf_counter() - t1)
    ms = {L: C.median(v) * 1e3 for L, v in times.items()}
    return {
        "base": base, "prompt": long_, "base_ms": ms[base], "long_ms": ms[long_], "growth": ms[long_] / ms[base],
        "steps_each": blocks * PAIR_BLOCK, "step_ms": {str(L): [t * 1e3 for t in v] for L, v in times.items()},
        "setup_s": setup_s,
    }  # fmt: skip


def w_profile(spec: dict) -> dict:
    """Where our batch-1 decode step goes: the step replayed as one native call (the default) against the per-op
    path (enforce_eager) in one process; the per-op path's component wall times and torch.profiler's top aten ops."""
    from torch.profiler import ProfilerActivity, profile

    from nemotron3.config import MOE

    name = spec["model"]
    mc = C.config(name)
    steps = spec.get("steps", 24)
    llm, opts = _ours_llm(name, spec["weights"], 1, DEC_PROMPT + 3 * steps + 16, 4096)
    eng = llm.engine
    eng.add_request("p", C.random_prompt(DEC_PROMPT, mc.vocab_size, seed=100), greedy(3 * steps + 8))
    eng.step()  # prefill
    for _ in range(4):
        eng.step()
    runner = eng.runner
    # 0) the decode program's step, then the per-op path's from here on (runner.use_program off)
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    program_ms = (time.perf_counter() - t0) / steps * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            eng.step()
    program_aten = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / steps
    used_program = runner._program is not None
    runner.use_program = False
    # 1) component times by wrapping the runner's stages (no profiler overhead)
    acc: dict[str, float] = {}

    def timed(key, fn):
        def f(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0
            return out

        return f

    runner._mamba = timed("mamba", runner._mamba)
    runner._attention = timed("attention", runner._attention)
    originals = []
    for i, block in enumerate(llm.model.backbone.layers):
        if mc.layers_block_type[i] == MOE:
            originals.append((block.mixer, block.mixer.forward))
            block.mixer.forward = timed("moe", block.mixer.forward)
    import nemotron3.engine.runner as runner_module  # the runner applies lm_head through fused.apply

    head, apply = llm.model.lm_head, runner_module.apply
    timed_head = timed("lm_head", apply)
    runner_module.apply = lambda module, x: timed_head(module, x) if module is head else apply(module, x)
    run_step = runner.step
    runner.step = timed("runner_step", run_step)
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    total = time.perf_counter() - t0
    for mod, fwd in originals:
        del mod.forward
    runner_module.apply = apply
    del runner.step, runner._mamba, runner._attention
    comp = {k: v / steps * 1e3 for k, v in acc.items()}
    comp["engine_step"] = total / steps * 1e3
    comp["engine_step_program"] = program_ms if used_program else None
    comp["scheduler_sampler_outputs"] = comp["engine_step"] - comp["runner_step"]
    comp["norms_embed_residual_other"] = comp["runner_step"] - sum(
        comp.get(k, 0.0) for k in ("mamba", "attention", "moe", "lm_head")
    )
    # 2) torch.profiler over the same number of steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            eng.step()
    ev = prof.key_averages()
    rows = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)
    self_total = sum(e.self_cpu_time_total for e in ev)
    top = [
        {
            "op": e.key,
            "calls_per_step": e.count / steps,
            "self_ms_per_step": e.self_cpu_time_total / steps / 1e3,
            "share": e.self_cpu_time_total / self_total if self_total else None,
        }
        for e in rows[:15]
    ]
    aten_calls = sum(e.count for e in ev if e.key.startswith("aten::")) / steps
    bytes_ = C.decode_bytes(mc, DEC_PROMPT + 2 * steps)
    return {
        "components_ms_per_step": comp,
        "top_ops": top,
        "aten_calls_per_step": aten_calls,
        "aten_calls_per_step_program": program_aten if used_program else None,
        "program_speedup": comp["engine_step"] / program_ms if used_program else None,
        "profiled_ms_per_step": self_total / steps / 1e3,
        "roofline_ms": bytes_["roofline_ms"],
        "engine_options": opts,
    }


WORKERS = {
    "decode": w_decode, "prefill": w_prefill, "context": w_context, "context_pair": w_context_pair,
    "profile": w_profile,
}  # fmt: skip


def run_scenario(spec: dict) -> dict:
    torch.set_num_threads(C.THREADS)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    res = WORKERS[spec["scenario"]](spec)
    res["worker_s"] = time.perf_counter() - t0
    res["peak_rss_mib"] = C.peak_rss_mib()  # VmHWM of this process
    res["ru_maxrss_mib"] = C.maxrss_mib()
    res["spec"] = spec
    return res


def worker_main(spec: dict) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    if spec["engine"] == "hf":
        import transformers

        transformers.logging.set_verbosity_error()
    print(json.dumps(run_scenario(spec)))


# ============================================================================================ plan


def plan(mode: str) -> dict:
    """What a run measures. full: ~15-25 min; quick: ~5-10 min; smoke: tiny configs, in-process, seconds."""
    full = {
        "models": {"hybrid": "nemo50", "big": "nemo300", "attn": "nemo50-attn"},
        "reps": 3,  # A/B repetitions (processes per engine and cell)
        "dec_prompt": DEC_PROMPT,  # (a)
        "conc": [1, 8, 32],  # (b) concurrent requests
        "conc_prompt": 512,
        "hf_b8": True,  # (b) also transformers at batch 8
        "prefill": [512, 2048],  # (c)
        "prefill_calls": 5,  # (c) timed calls per worker after its warm-up (2 until 2026-11-30 13:00: noisier)
        "contexts": [512, 2048, 8192, 32768],  # (d)
        "context_reps": 3,  # reps at contexts <= 2048 (one run above)
        "hf_context_limit_s": 150,  # (d) skip transformers where one run is predicted to take longer
        "profile": True,
        "profile_steps": 24,
        "bf16_weights": True,  # (a) also ours with weight-only bf16 (not a target: the targets are fp32)
        "eager_arm": True,  # (a) also ours with enforce_eager (every step per op): what the decode program gains
        "kv_bf16_pair": True,  # (d) also the one-process pair over a bf16 K/V pool
        "amx_precisions": ["high", "medium"],  # (c) also ours under these matmul precisions (AMX; "medium" on AVX512-BF16)
        "worker_timeout": 560,
        "budget_min": 25,
        "quiet_wait_s": 20,  # wait up to this long for other processes to go idle before each worker
        "in_process": False,
    }
    if mode == "quick":
        return {
            **full, "contexts": [512, 2048, 8192], "context_reps": 1, "hf_b8": False, "profile": False,
            "hf_context_limit_s": 120, "worker_timeout": 400, "budget_min": 12, "quiet_wait_s": 15,
        }  # fmt: skip
    if mode == "smoke":
        return {
            **full, "models": {"hybrid": "tiny50", "big": "tiny300", "attn": "tiny50-attn"}, "reps": 1,
            "dec_prompt": 64, "conc": [1, 2, 4], "conc_prompt": 64, "prefill": [32, 64], "prefill_calls": 2,
            "contexts": [32, 128], "context_reps": 1, "hf_context_limit_s": 60, "profile_steps": 4,
            "worker_timeout": 120, "budget_min": 5, "quiet_wait_s": 0, "in_process": True,
        }  # fmt: skip
    return full


class Runner:
    """Runs worker processes, keeps every raw result, and watches the overall time budget."""

    def __init__(
        self, weights: dict[str, str], budget_s: float, timeout: float, log, quiet_wait_s: float = 0.0,
        in_process: bool = False,
    ):  # fmt: skip
        self.weights = weights
        self.in_process = in_process
        self.quiet_wait_s = quiet_wait_s
        self.deadline = time.perf_counter() + budget_s
        self.timeout = timeout
        self.raw: list[dict] = []
        self.log = log

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def run(self, **spec) -> dict:
        spec["weights"] = self.weights[spec["model"]]
        label = " ".join(f"{k}={v}" for k, v in spec.items() if k != "weights")
        if self.left() < 5:
            res = {"error": "skipped: over the time budget", "spec": spec}
        elif self.in_process:  # smoke: no process per scenario (peak RSS is then this process's peak)
            t0 = time.perf_counter()
            try:
                res = run_scenario(dict(spec))
            except Exception as e:  # noqa: BLE001 - recorded in the JSON like a failed worker
                res = {"error": f"{type(e).__name__}: {e}", "spec": spec}
            res["process_wall_s"] = time.perf_counter() - t0
            res["foreign_cpus"] = None
        else:
            timeout = min(self.timeout, max(10.0, self.left()))
            res = C.run_worker(
                HERE / "bench_engine.py", spec, timeout, min(self.quiet_wait_s, max(0.0, self.left() - 60))
            )
        res.setdefault("spec", spec)
        self.raw.append(res)
        if "error" in res:
            self.log(f"  {label}: ERROR {res['error'][:300]}")
        else:
            ms, tok, rss = res.get("median_ms"), res.get("tok_s"), res.get("peak_rss_mib")
            wall, other = res.get("process_wall_s", 0), _f(res.get("foreign_cpus"), 2)
            self.log(
                f"  {label}: ms={_f(ms, 2)} tok/s={_f(tok)} rss={_f(rss, 0)} MiB ({wall:.1f} s, other load {other})"
            )
        return res


_f = C.fmt


def ab(r: Runner, rep: int, **spec) -> tuple[dict, dict]:
    """One A/B pair; the order alternates with the rep so neither engine always runs first."""
    order = ("ours", "hf") if rep % 2 == 0 else ("hf", "ours")
    out = {e: r.run(engine=e, **spec) for e in order}
    return out["ours"], out["hf"]


def _vals(results: list[dict], key: str) -> list[float]:
    return [x[key] for x in results if "error" not in x and x.get(key) is not None]


def _cell(results: list[dict], key: str = "tok_s") -> dict:
    ok = [x for x in results if "error" not in x]
    return {
        "reps": len(ok),
        "values": _vals(results, key),
        "median": C.median(_vals(results, key)),
        "median_ms": C.median(_vals(results, "median_ms")),
        "peak_rss_mib": C.median(_vals(results, "peak_rss_mib")),
        "peak_rss_mib_max": max(_vals(results, "peak_rss_mib"), default=None),
        "errors": [x["error"] for x in results if "error" in x],
    }


def _ratio(a, b):
    return a / b if a is not None and b else None


def orchestrate(mode: str, out_dir: Path, log, overrides: dict | None = None) -> dict:
    P = plan(mode)
    P.update({k: v for k, v in (overrides or {}).items() if v is not None})
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="nemotron3-bench-"))
    names = sorted(set(P["models"].values()))
    try:
        weights = {}
        for n in names:
            log(f"weights {n} (transformers random init, seed 0)")
            make = C.make_weights if P["in_process"] else C.make_weights_in_subprocess
            weights[n] = str(make(n, tmp / f"{n}.safetensors"))
        budget = P["budget_min"] * 60 - (time.perf_counter() - t_start)
        r = Runner(weights, budget, P["worker_timeout"], log, P["quiet_wait_s"], P["in_process"])
        results = run_all(r, P, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import transformers  # noqa: F401

    data = {
        "benchmark": "nemotron3 engine vs transformers generate",
        "mode": mode,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": C.machine_info(),
        "method": __doc__,
        "plan": P,
        "configs": {n: C.describe(C.config(n)) for n in names},
        "results": results,
        "raw": r.raw,
        "total_s": time.perf_counter() - t_start,
        "contention": {
            "workers": len(r.raw),
            "workers_with_other_load_over_0.3_cpus": sum(1 for x in r.raw if (x.get("foreign_cpus") or 0) > 0.3),
            "max_other_load_cpus": max((x.get("foreign_cpus") or 0 for x in r.raw), default=None),
            "note": "other processes' CPU use during each worker (2 vCPUs; see common.run_worker)",
        },
    }
    data["targets"] = targets(data)
    return data


def run_all(r: Runner, P: dict, log) -> dict:
    M = P["models"]
    res: dict = {"decode_b1": {}, "concurrency": {}, "prefill": {}, "context": {}, "context_pair": {}, "profile": {}}
    dp = P["dec_prompt"]

    # (a) batch-1 decode, both configs, A/B interleaved; then ours with weight-only bf16 and ours eager beside them
    log("(a) batch-1 decode")
    raw = {m: {"ours": [], "hf": [], "bf16": [], "eager": []} for m in (M["hybrid"], M["big"])}
    for rep in range(P["reps"]):
        for m in raw:
            o, h = ab(r, rep, scenario="decode", model=m, batch=1, prompt=dp, count_experts=(rep == 0))
            raw[m]["ours"].append(o)
            raw[m]["hf"].append(h)
            if P["bf16_weights"]:
                spec = {"scenario": "decode", "model": m, "batch": 1, "prompt": dp, "weight_dtype": "bfloat16"}
                raw[m]["bf16"].append(r.run(engine="ours", **spec))
            if P["eager_arm"]:
                spec = {"scenario": "decode", "model": m, "batch": 1, "prompt": dp, "enforce_eager": True}
                raw[m]["eager"].append(r.run(engine="ours", **spec))
    for m, d in raw.items():
        mc = C.config(m)
        ours, hf = _cell(d["ours"]), _cell(d["hf"])
        b = C.decode_bytes(mc, dp + DEC_NEW // 2)
        pairs = [_ratio(o.get("tok_s"), h.get("tok_s")) for o, h in zip(d["ours"], d["hf"])]
        toks = [x.get("tokens") for x in d["ours"] + d["hf"] if "error" not in x]
        res["decode_b1"][m] = {
            "prompt": dp, "ours": ours, "hf": hf, "speedup_vs_hf": _ratio(ours["median"], hf["median"]),
            "paired_speedups": pairs, "bytes_per_step": b,
            "roofline_tok_s": 1e3 / b["roofline_ms"],
            "ours_roofline_fraction": _ratio(b["roofline_ms"], ours["median_ms"]),
            "hf_roofline_fraction": _ratio(b["roofline_ms"], hf["median_ms"]),
            "ours_achieved_gbs": _ratio(b["total"] / 1e6, ours["median_ms"]),
            "greedy_tokens_identical": len(toks) > 1 and all(t == toks[0] for t in toks),
        }  # fmt: skip
        if d["bf16"]:
            cell, b16 = _cell(d["bf16"]), C.decode_bytes(mc, dp + DEC_NEW // 2, matrix_elt=2)
            res["decode_b1"][m]["ours_bf16_weights"] = {
                **cell, "speedup_vs_hf_fp32": _ratio(cell["median"], hf["median"]),
                "speedup_vs_ours_fp32": _ratio(cell["median"], ours["median"]), "bytes_per_step": b16,
                "roofline_fraction": _ratio(b16["roofline_ms"], cell["median_ms"]),
                "achieved_gbs": _ratio(b16["total"] / 1e6, cell["median_ms"]),
            }  # fmt: skip
        if d["eager"]:
            cell = _cell(d["eager"])
            res["decode_b1"][m]["ours_eager"] = {
                **cell, "speedup_vs_hf": _ratio(cell["median"], hf["median"]),
                "program_speedup": _ratio(ours["median"], cell["median"]),
                "roofline_fraction": _ratio(b["roofline_ms"], cell["median_ms"]),
            }  # fmt: skip

    # (b) aggregate decode with N concurrent requests (ours); transformers batch 8 optional
    log("(b) concurrency")
    conc = {m: {n: [] for n in P["conc"] if n != 1} for m in (M["hybrid"], M["big"])}
    hf8 = {m: [] for m in conc}
    for rep in range(P["reps"]):
        for m, cells in conc.items():
            for n, runs in cells.items():
                spec = {"scenario": "decode", "model": m, "batch": n, "prompt": P["conc_prompt"]}
                runs.append(r.run(engine="ours", count_experts=rep == 0, **spec))
            if P["hf_b8"]:
                b8 = 8 if 8 in P["conc"] else max(n for n in P["conc"] if n > 1)
                hf8[m].append(r.run(engine="hf", scenario="decode", model=m, batch=b8, prompt=P["conc_prompt"]))
    for m in conc:
        hf1 = res["decode_b1"][m]["hf"]["median"]
        rows = {}
        for n in P["conc"]:
            if n == 1 and P["conc_prompt"] == dp:
                runs = raw[m]["ours"]
            elif n == 1:
                continue
            else:
                runs = conc[m][n]
            cell = _cell(runs)
            cell["e2e_tok_s"] = C.median(_vals(runs, "e2e_tok_s"))
            cell["distinct_experts"] = C.median(_vals(runs, "distinct_experts"))
            cell["vs_hf_batch1"] = _ratio(cell["median"], hf1)
            rows[str(n)] = cell
        entry = {"prompt": P["conc_prompt"], "ours": rows, "hf_batch1_tok_s": hf1}
        if P["hf_b8"]:
            entry["hf_batch8"] = {**_cell(hf8[m]), "batch": hf8[m][0]["spec"]["batch"] if hf8[m] else None}
        res["concurrency"][m] = entry

    # (c) prefill, batch 1
    log("(c) prefill")
    precisions = [p for p in P["amx_precisions"] if p in native.bf16_precisions()]
    arms = ("ours", "hf", *precisions)
    pre = {m: {L: {a: [] for a in arms} for L in P["prefill"]} for m in (M["hybrid"], M["big"])}
    for rep in range(P["reps"]):
        for m in pre:
            for L in P["prefill"]:
                o, h = ab(r, rep, scenario="prefill", model=m, prompt=L, calls=P["prefill_calls"])
                pre[m][L]["ours"].append(o)
                pre[m][L]["hf"].append(h)
                for p in precisions:
                    spec = {"scenario": "prefill", "model": m, "prompt": L, "calls": P["prefill_calls"]}
                    pre[m][L][p].append(r.run(engine="ours", matmul_precision=p, **spec))
    for m, cells in pre.items():
        res["prefill"][m] = {}
        for L, d in cells.items():
            ours, hf = _cell(d["ours"]), _cell(d["hf"])
            res["prefill"][m][str(L)] = {
                "ours": ours, "hf": hf, "speedup_vs_hf": _ratio(ours["median"], hf["median"]),
                "paired_speedups": [_ratio(o.get("tok_s"), h.get("tok_s")) for o, h in zip(d["ours"], d["hf"])],
            }  # fmt: skip
            for p in precisions:
                cell = _cell(d[p])
                res["prefill"][m][str(L)][f"ours_matmul_{p}"] = {
                    **cell, "speedup_vs_hf": _ratio(cell["median"], hf["median"]),
                    "speedup_vs_ours_highest": _ratio(cell["median"], ours["median"]),
                }  # fmt: skip

    # (d) decode ms/token vs context: hybrid and attention-only, ours and transformers
    log("(d) context scaling")
    ctx = {m: {L: {"ours": [], "hf": []} for L in P["contexts"]} for m in (M["hybrid"], M["attn"])}
    hf_skip: dict[str, dict[int, str]] = {m: {} for m in ctx}
    for L in P["contexts"]:
        reps = P["reps"] if L <= 2048 else 1
        reps = min(reps, P["context_reps"]) if L > 512 else max(1, min(P["reps"], P["context_reps"]))
        for _ in range(reps):
            for m, cells in ctx.items():
                cells[L]["ours"].append(r.run(engine="ours", scenario="context", model=m, prompt=L))
                why = _hf_guard(cells, L, P["hf_context_limit_s"], r.left())
                if why:
                    hf_skip[m][L] = why
                    continue
                cells[L]["hf"].append(r.run(engine="hf", scenario="context", model=m, prompt=L))
    for m, cells in ctx.items():
        rows = {}
        for L, d in cells.items():
            ours, hf = _cell(d["ours"], "median_ms"), _cell(d["hf"], "median_ms")
            for cell, runs in ((ours, d["ours"]), (hf, d["hf"])):
                cell["prefill_tok_s"] = C.median(_vals(runs, "prefill_tok_s"))
                cell["prefill_s"] = C.median(_vals(runs, "prefill_s"))
            rows[str(L)] = {"ours": ours, "hf": hf, "hf_skipped": hf_skip[m].get(L)}
        base_o = rows[str(P["contexts"][0])]["ours"]["median_ms"]
        base_h = rows[str(P["contexts"][0])]["hf"]["median_ms"]
        for L, row in rows.items():
            row["ours_growth_vs_first"] = _ratio(row["ours"]["median_ms"], base_o)
            row["hf_growth_vs_first"] = _ratio(row["hf"]["median_ms"], base_h)
        res["context"][m] = rows
    # (d) the growth the target uses: both contexts in one process, interleaved (w_context_pair)
    lo, hi = min(P["contexts"]), max(P["contexts"])
    res["context_pair"] = {
        m: r.run(engine="ours", scenario="context_pair", model=m, prompt=hi, base=lo) for m in (M["hybrid"], M["attn"])
    }
    if P["kv_bf16_pair"]:  # the same pair over a bf16 K/V pool (kv_cache_dtype): half the K/V bytes
        res["context_pair_kv_bf16"] = {
            m: r.run(engine="ours", scenario="context_pair", model=m, prompt=hi, base=lo, kv_cache_dtype="bfloat16")
            for m in (M["hybrid"], M["attn"])
        }  # fmt: skip

    if P["profile"]:
        log("profile (ours, batch-1 decode)")
        for m in (M["hybrid"], M["big"]):
            res["profile"][m] = r.run(engine="ours", scenario="profile", model=m, steps=P["profile_steps"])
    return res


def _hf_guard(cells: dict, L: int, limit_s: float, left_s: float) -> str | None:
    """Skip transformers at a context where its run is predicted to exceed `limit_s` (or the budget left).

    The prediction scales the last measured transformers worker at a shorter context by (L / L0)^1.5
    (attention prefill grows as L², the rest as L)."""
    done = [(L0, x["process_wall_s"]) for L0, d in cells.items() if L0 < L for x in d["hf"] if "error" not in x]
    if not done:
        return None
    L0, s0 = max(done)
    predicted = s0 * (L / L0) ** 1.5
    if predicted > limit_s:
        return f"predicted {predicted:.0f} s (> {limit_s:.0f} s guard) from {s0:.0f} s at {L0}"
    if predicted > left_s - 60:
        return f"predicted {predicted:.0f} s; only {left_s:.0f} s of the time budget left"
    return None


def targets(data: dict) -> list[dict]:
    """The issue's targets beside the measured ratios (nothing here is assumed: None = not measured)."""
    res, P = data["results"], data["plan"]
    M = P["models"]
    hyb, big, att = M["hybrid"], M["big"], M["attn"]
    out = []

    def add(target, measured, threshold, note=""):
        out.append({
            "target": target, "measured": measured, "threshold": threshold,
            "met": None if measured is None else measured >= threshold, "note": note,
        })  # fmt: skip

    d = res["decode_b1"]
    add(f"{hyb} batch-1 decode >= 3x transformers", d.get(hyb, {}).get("speedup_vs_hf"), 3.0)
    add(f"{big} batch-1 decode >= 70% of the 35 GB/s roofline", d.get(big, {}).get("ours_roofline_fraction"), 0.70)
    c = res["concurrency"].get(hyb, {}).get("ours", {})
    n_max = str(max(P["conc"]))
    vs = c.get(n_max, {}).get("vs_hf_batch1")
    add(f"{hyb} {n_max} concurrent aggregate decode >= 10x transformers batch-1", vs, 10.0)
    L = str(max(P["prefill"]))
    for m in (hyb, big):
        add(f"{m} prefill@{L} >= 2x transformers", res["prefill"].get(m, {}).get(L, {}).get("speedup_vs_hf"), 2.0)
    ctx, pair = res["context"], res.get("context_pair", {})
    Lmax, L0 = str(max(P["contexts"])), str(min(P["contexts"]))
    g, ga = pair.get(hyb, {}).get("growth"), pair.get(att, {}).get("growth")
    g_sep = ctx.get(hyb, {}).get(Lmax, {}).get("ours_growth_vs_first")
    ga_sep = ctx.get(att, {}).get(Lmax, {}).get("ours_growth_vs_first")
    out.append({
        "target": f"{hyb} decode time at {Lmax} <= 1.3x the time at {L0} (ours, one process)", "measured": g,
        "threshold": 1.3, "met": None if g is None else g <= 1.3,
        "note": f"attention-only twin {att}: {_f(ga, 2)}x; separate processes (table d): {_f(g_sep, 2)}x / {_f(ga_sep, 2)}x",
        "attention_only_growth": ga, "separate_process_growth": g_sep, "attention_only_separate_growth": ga_sep,
    })  # fmt: skip
    return out


# ============================================================================================ report


def summary_lines(data: dict) -> list[str]:
    res = data["results"]
    lines = []
    lines.append("| measurement | ours | transformers | ratio |")
    lines.append("|---|---|---|---|")
    for m, d in res["decode_b1"].items():
        o, h = d["ours"], d["hf"]
        lines.append(
            f"| {m} decode b1 @{d['prompt']} tok/s (ms/step) | {_f(o['median'])} ({_f(o['median_ms'], 2)}) "
            f"| {_f(h['median'])} ({_f(h['median_ms'], 2)}) | {_f(d['speedup_vs_hf'], 2)}x |"
        )
        lines.append(
            f"| {m} roofline {_f(d['roofline_tok_s'])} tok/s ({d['bytes_per_step']['total'] / 1e6:.1f} MB/step) "
            f"| {_pct(d['ours_roofline_fraction'])} | {_pct(d['hf_roofline_fraction'])} | |"
        )
        if "ours_bf16_weights" in d:
            w = d["ours_bf16_weights"]
            lines.append(
                f"| {m} decode b1, ours with weight-only bf16 ({w['bytes_per_step']['total'] / 1e6:.1f} MB/step, "
                f"{_pct(w['roofline_fraction'])} of its roofline) | {_f(w['median'])} ({_f(w['median_ms'], 2)}) "
                f"| fp32 {_f(h['median'])} | {_f(w['speedup_vs_hf_fp32'], 2)}x |"
            )
        if "ours_eager" in d:
            e = d["ours_eager"]
            lines.append(
                f"| {m} decode b1, ours with enforce_eager (the decode program gains {_f(e['program_speedup'], 2)}x) "
                f"| {_f(e['median'])} ({_f(e['median_ms'], 2)}) | {_f(h['median'])} | {_f(e['speedup_vs_hf'], 2)}x |"
            )
    for m, d in res["concurrency"].items():
        for n, cell in d["ours"].items():
            lines.append(
                f"| {m} aggregate decode, {n} concurrent, tok/s | {_f(cell['median'])} "
                f"| b1 {_f(d['hf_batch1_tok_s'])} | {_f(cell['vs_hf_batch1'], 2)}x HF b1 |"
            )
        if "hf_batch8" in d:
            lines.append(f"| {m} transformers batch 8 tok/s | | {_f(d['hf_batch8']['median'])} | |")
    for m, d in res["prefill"].items():
        for L, cell in d.items():
            lines.append(
                f"| {m} prefill @{L} tok/s | {_f(cell['ours']['median'], 0)} | {_f(cell['hf']['median'], 0)} "
                f"| {_f(cell['speedup_vs_hf'], 2)}x |"
            )
            for key, arm in cell.items():
                if key.startswith("ours_matmul_"):
                    lines.append(
                        f"| {m} prefill @{L} tok/s, matmul_precision {key[12:]} | {_f(arm['median'], 0)} "
                        f"| | {_f(arm['speedup_vs_hf'], 2)}x ({_f(arm['speedup_vs_ours_highest'], 2)}x ours fp32) |"
                    )
    for m, rows in res["context"].items():
        for L, row in rows.items():
            hf, ours = row["hf"]["median_ms"], row["ours"]["median_ms"]
            note = f" (transformers skipped: {row['hf_skipped']})" if row.get("hf_skipped") else ""
            lines.append(
                f"| {m} decode ms/token @{L} | {_f(ours, 2)} (x{_f(row['ours_growth_vs_first'], 2)}) "
                f"| {_f(hf, 2)} (x{_f(row['hf_growth_vs_first'], 2)}){note} | {_f(_ratio(hf, ours), 2)}x |"
            )
    for key, note in (("context_pair", ""), ("context_pair_kv_bf16", ", bf16 K/V")):
        for m, pr in res.get(key, {}).items():
            if "error" not in pr:
                lines.append(
                    f"| {m} one process{note}: @{pr['prompt']} vs @{pr['base']} ms/token | {_f(pr['long_ms'], 2)} vs "
                    f"{_f(pr['base_ms'], 2)} (x{_f(pr['growth'], 2)}) | | |"
                )
    lines.append("")
    lines.append("| target | measured | met |")
    lines.append("|---|---|---|")
    for t in data["targets"]:
        lines.append(f"| {t['target']} | {_f(t['measured'], 2)} {t.get('note', '')} | {t['met']} |")
    return lines


def _pct(x):
    return "-" if x is None else f"{100 * x:.0f}%"


def plot(data: dict, path: Path) -> bool:
    plt = C.pyplot()
    if plt is None:
        return False
    import matplotlib.ticker

    res, P = data["results"], data["plan"]
    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    # decode b1
    a = ax[0, 0]
    ms = list(res["decode_b1"])
    x = range(len(ms))
    o = [res["decode_b1"][m]["ours"]["median"] or 0 for m in ms]
    h = [res["decode_b1"][m]["hf"]["median"] or 0 for m in ms]
    roof = [res["decode_b1"][m]["roofline_tok_s"] for m in ms]
    w16 = [(res["decode_b1"][m].get("ours_bf16_weights") or {}).get("median") or 0 for m in ms]
    eager = [(res["decode_b1"][m].get("ours_eager") or {}).get("median") or 0 for m in ms]
    bars = [(o, "nemotron3"), (h, "transformers 5.23")] + ([(w16, "nemotron3, weight-only bf16")] if any(w16) else [])
    bars += [(eager, "nemotron3, enforce_eager")] if any(eager) else []
    width = 0.8 / len(bars)
    for j, (vals, label) in enumerate(bars):
        off = (j - (len(bars) - 1) / 2) * width
        a.bar([i + off for i in x], vals, width, label=label)
        for i in x:
            a.annotate(f"{vals[i]:.0f}", (i + off, vals[i]), ha="center", va="bottom", fontsize=8)
    a.scatter(list(x), roof, marker="_", s=900, color="k", label="35 GB/s roofline (fp32)")
    for i in x:
        a.annotate(f"roofline {roof[i]:.0f}", (i, roof[i]), ha="center", va="bottom", fontsize=8)
    a.set_xticks(list(x), [f"{m}\n@{res['decode_b1'][m]['prompt']}" for m in ms])
    a.set_ylabel("tok/s")
    a.set_title("(a) batch-1 decode")
    a.legend(fontsize=8)
    # concurrency
    a = ax[0, 1]
    for m, d in res["concurrency"].items():
        ns = [int(n) for n in d["ours"]]
        a.plot(ns, [d["ours"][str(n)]["median"] for n in ns], "o-", label=f"nemotron3 {m}")
        if d["hf_batch1_tok_s"]:
            a.axhline(d["hf_batch1_tok_s"], ls=":", color=a.lines[-1].get_color(), label=f"transformers b1 {m}")
        if "hf_batch8" in d and d["hf_batch8"]["median"]:
            b8 = d["hf_batch8"]
            a.plot([b8["batch"]], [b8["median"]], "s", color=a.lines[-1].get_color(), mfc="none",
                   label=f"transformers b{b8['batch']} {m}")  # fmt: skip
    hyb = P["models"]["hybrid"]
    if res["concurrency"].get(hyb, {}).get("hf_batch1_tok_s"):
        a.axhline(
            10 * res["concurrency"][hyb]["hf_batch1_tok_s"], ls="--", color="gray", label=f"10x transformers b1 ({hyb})"
        )
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    a.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    a.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    a.set_xticks(P["conc"], [str(n) for n in P["conc"]])
    a.set_xlabel("concurrent requests")
    a.set_ylabel("aggregate decode tok/s")
    a.set_title("(b) aggregate decode vs concurrency")
    a.legend(fontsize=7)
    # prefill
    a = ax[1, 0]
    labels, o, h = [], [], []
    for m, d in res["prefill"].items():
        for L, cell in d.items():
            labels.append(f"{m}\n@{L}")
            o.append(cell["ours"]["median"] or 0)
            h.append(cell["hf"]["median"] or 0)
    x = range(len(labels))
    a.bar([i - 0.2 for i in x], o, 0.4, label="nemotron3")
    a.bar([i + 0.2 for i in x], h, 0.4, label="transformers 5.23")
    a.set_xticks(list(x), labels, fontsize=8)
    a.set_ylabel("prefill tok/s (batch 1)")
    a.set_title("(c) prefill")
    a.legend(fontsize=8)
    # context
    a = ax[1, 1]
    for m, rows in res["context"].items():
        Ls = [int(L) for L in rows]
        pts = [(L, rows[str(L)]["ours"]["median_ms"]) for L in Ls if rows[str(L)]["ours"]["median_ms"]]
        if pts:
            a.plot(*zip(*pts), "o-", label=f"nemotron3 {m}")
        pts = [(L, rows[str(L)]["hf"]["median_ms"]) for L in Ls if rows[str(L)]["hf"]["median_ms"]]
        if pts:
            a.plot(*zip(*pts), "s--", label=f"transformers {m}")
    for key, marker, note in (("context_pair", "*", "one process"), ("context_pair_kv_bf16", "P", "one process, bf16 K/V")):
        for m, pr in res.get(key, {}).items():  # the target's measurement: both contexts in one process
            if "error" not in pr:
                a.plot([pr["base"], pr["prompt"]], [pr["base_ms"], pr["long_ms"]], marker=marker, ls=":", ms=9,
                       label=f"nemotron3 {m}, {note} (x{pr['growth']:.2f})")  # fmt: skip
    a.set_xscale("log", base=2)
    a.set_xticks(P["contexts"], [f"{L // 1024}k" if L >= 1024 else str(L) for L in P["contexts"]])
    a.set_ylim(bottom=0)
    a.set_xlabel("context tokens")
    a.set_ylabel("decode ms/token (batch 1)")
    a.set_title("(d) decode cost vs context: hybrid vs attention-only")
    a.legend(fontsize=7)
    m = data["machine"]
    fig.suptitle(
        f"nemotron3 vs transformers {m.get('transformers')} — fp32, {m['torch_threads']} threads, {m['cpu']}",
        fontsize=10,
    )
    C.save_png(plt, fig, path)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="fewer reps and contexts (~5 min)")
    g.add_argument("--smoke", action="store_true", help="tiny configs, 1 rep (for tests)")
    p.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--reps", type=int, default=None, help="A/B repetitions (default 3; smoke 1)")
    p.add_argument("--budget-min", type=float, default=None, help="overall time budget in minutes (default 25)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        dest="quiet_wait_s",
        help="seconds to wait for other processes to go idle before each worker (default 20)",
    )
    p.add_argument("--from-json", type=Path, default=None, help="redraw the PNG and summary from an engine.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        png = (args.out or args.from_json.parent) / "engine.png"
        print("\n".join(summary_lines(data)))
        if not args.no_plot:
            print(f"wrote {png}" if plot(data, png) else "no PNG: matplotlib is not installed")
        return 0
    torch.set_num_threads(C.THREADS)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    out = args.out or C.RESULTS
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    overrides = {"reps": args.reps, "budget_min": args.budget_min, "quiet_wait_s": args.quiet_wait_s}
    data = orchestrate(mode, out, log, overrides)
    json_path = out / "engine.json"
    png_path = out / "engine.png"
    data["png"] = str(png_path) if (not args.no_plot and plot(data, png_path)) else None
    C.write_json(json_path, data)
    print("\n".join(summary_lines(data)))
    print(f"wrote {json_path}" + (f" and {png_path}" if data["png"] else " (no PNG: matplotlib missing or --no-plot)"))
    print(f"total {data['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
