"""Automatic prefix caching: time to first token with and without it, on a shared system prompt and a chat.

    .venv/bin/python benchmarks/bench_prefix_cache.py            # nemo50, 1024-token system prompt, 6-turn chat
    .venv/bin/python benchmarks/bench_prefix_cache.py --smoke    # seconds (the test uses it)

Scenarios (greedy, one request at a time, as users arriving one after another):
  system  `--requests` prompts = one `--system-len`-token system prompt + a distinct `--question-len`-token question,
          `--max-tokens` new tokens each. With caching, the first request caches the blocks; the second finds them
          but no Mamba state at their end, so it computes everything and saves one there (its branch point); from
          the third on, requests resume after the system prompt.
  chat    one conversation of `--turns` turns: each prompt is the previous prompt + its answer + `--turn-len` new
          user tokens. With caching, each turn resumes at the last block end its previous turn's decoding reached.
Both engines hold the same random-weight model (init_weights, seed 0) in one process; each repetition uses fresh
random tokens and starts from an empty cache (reset_prefix_cache); repetitions alternate A/B/B/A; cells are
medians. Time to first token is the engine's own (RequestMetrics: first_token_time − arrival_time). Both engines
must produce the same tokens (checked: a resumed state is the state the full prefill computes, to rounding).

Predicted, nemo50 fp32 on the 2-vCPU VM (prefill ~8,000 tok/s at 1-2k tokens, chunks of 512): system prompt, from
the third request on, 1,088 prompt tokens (~0.14 s) against 64 + up to 15 (~0.012 s): ~10×. Chat: turn k feeds
1,024 + 160·(k−1) tokens without caching (0.13 → 0.23 s) and ~160 + up to 15 with it (~0.02 s): ~6-10× from the
second turn on.

Writes benchmarks/results/prefix_cache.json and .png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import common as C
import torch

from nemotron3 import LLM, SamplingParams


def ask(llm: LLM, prompt: list[int], max_tokens: int) -> dict:
    """One request alone: its time to first token, wall time, cached tokens and tokens."""
    t0 = time.perf_counter()
    (out,) = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                          ignore_eos=True), use_tqdm=False)  # fmt: skip
    wall = time.perf_counter() - t0
    m = out.metrics
    return {"ttft_s": m.first_token_time - m.arrival_time, "wall_s": wall, "prompt_tokens": len(prompt),
            "cached_tokens": out.num_cached_tokens, "tokens": out.outputs[0].token_ids}  # fmt: skip


def system_prompt_run(llm: LLM, args, seed: int) -> list[dict]:
    vocab = llm.engine.model.config.vocab_size
    system = C.random_prompt(args.system_len, vocab, seed)
    questions = [C.random_prompt(args.question_len, vocab, seed + 1 + i) for i in range(args.requests)]
    return [ask(llm, system + q, args.max_tokens) for q in questions]


def chat_run(llm: LLM, args, seed: int) -> list[dict]:
    vocab = llm.engine.model.config.vocab_size
    prompt, turns = C.random_prompt(args.system_len, vocab, seed), []
    for k in range(args.turns):
        turns.append(ask(llm, prompt, args.max_tokens))
        prompt = prompt + turns[-1]["tokens"] + C.random_prompt(args.turn_len, vocab, seed + 1 + k)
    return turns


def scenario(engines: dict, run, args) -> dict:
    """Both engines over `args.reps` repetitions (A/B/B/A): per request index, median TTFT on and off."""
    runs: dict[bool, list[list[dict]]] = {True: [], False: []}
    for llm in engines.values():  # warm-up: one repetition each, not kept
        run(llm, args, 10_000)
        llm.reset_prefix_cache()
    for rep in range(args.reps):
        for caching in (True, False) if rep % 2 == 0 else (False, True):
            engines[caching].reset_prefix_cache()
            runs[caching].append(run(engines[caching], args, 100 * rep))
    n = len(runs[True][0])
    per = []
    for i in range(n):
        on = statistics.median(r[i]["ttft_s"] for r in runs[True])
        off = statistics.median(r[i]["ttft_s"] for r in runs[False])
        per.append({"index": i, "prompt_tokens": runs[True][0][i]["prompt_tokens"],
                    "cached_tokens": runs[True][0][i]["cached_tokens"], "ttft_on_s": on, "ttft_off_s": off,
                    "speedup": off / on})  # fmt: skip
    wall = {c: statistics.median(sum(x["wall_s"] for x in r) for r in runs[c]) for c in (True, False)}
    same = all(a["tokens"] == b["tokens"] for ra, rb in zip(runs[True], runs[False]) for a, b in zip(ra, rb))
    return {"requests": per, "wall_on_s": wall[True], "wall_off_s": wall[False], "wall_speedup": wall[False] / wall[True],
            "tokens_identical": same}  # fmt: skip


def plot(result: dict, path: Path) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (name, label) in zip(axes, (("system", "request"), ("chat", "turn"))):
        reqs = result[name]["requests"]
        x = [r["index"] + 1 for r in reqs]
        ax.bar([i - 0.2 for i in x], [1e3 * r["ttft_off_s"] for r in reqs], 0.4, label="no prefix caching", color="#999")
        ax.bar([i + 0.2 for i in x], [1e3 * r["ttft_on_s"] for r in reqs], 0.4, label="prefix caching", color="#76b900")
        for i, r in zip(x, reqs):
            ax.text(i + 0.2, 1e3 * r["ttft_on_s"], f"{r['speedup']:.1f}×", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x)
        ax.set_xlabel(label)
        ax.set_ylabel("time to first token (ms)")
        ax.set_title({"system": f"{result['model']}: {result['system_len']}-token shared system prompt",
                      "chat": f"{result['model']}: chat, +{result['turn_len']} user tokens a turn"}[name])  # fmt: skip
        ax.set_ylim(0, 1.3 * max(1e3 * r["ttft_off_s"] for r in reqs))
        ax.legend(fontsize=8, loc="upper right")
    C.save_png(plt, fig, path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="nemo50", choices=["nemo50", "nemo300", "tiny50"])
    p.add_argument("--system-len", type=int, default=1024)
    p.add_argument("--question-len", type=int, default=64)
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--turn-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens")
    p.add_argument("--reps", type=int, default=4, help="repetitions (alternating A/B/B/A)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny model, short prompts, one repetition")
    p.add_argument("--out", default=str(C.RESULTS / "prefix_cache"), help="path without suffix (.json, .png)")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.system_len, args.question_len, args.turn_len = "tiny50", 48, 8, 12
        args.requests, args.turns, args.max_tokens, args.reps = 3, 3, 4, 1
    torch.set_num_threads(args.threads)
    model = C.random_model(args.model)
    longest = args.system_len + args.turns * (args.max_tokens + args.turn_len) + args.question_len + 64
    engines = {caching: LLM(model, max_num_seqs=4, max_num_batched_tokens=args.budget, max_model_len=longest,
                            kv_cache_memory_bytes=1 << 30, enable_prefix_caching=caching)
               for caching in (True, False)}  # fmt: skip
    result = {"model": args.model, "threads": args.threads, "budget": args.budget, "system_len": args.system_len,
              "question_len": args.question_len, "turn_len": args.turn_len, "max_tokens": args.max_tokens,
              "reps": args.reps, "machine": C.machine_info()}  # fmt: skip
    for name, run in (("system", system_prompt_run), ("chat", chat_run)):
        result[name] = res = scenario(engines, run, args)
        steady = res["requests"][2:] if name == "system" else res["requests"][1:]
        res["steady_speedup"] = statistics.median(r["speedup"] for r in steady)
        print(f"{args.model} {name}: TTFT speed-up (steady) {res['steady_speedup']:.2f}×, wall {res['wall_off_s']:.2f} "
              f"→ {res['wall_on_s']:.2f} s ({res['wall_speedup']:.2f}×); same tokens: {res['tokens_identical']}; "
              + ", ".join(f"{r['prompt_tokens']}/{r['cached_tokens']} {1e3 * r['ttft_off_s']:.0f}→"
                          f"{1e3 * r['ttft_on_s']:.0f} ms" for r in res["requests"]), flush=True)  # fmt: skip
    return C.write_results(args.out, result, plot)


if __name__ == "__main__":
    main()
