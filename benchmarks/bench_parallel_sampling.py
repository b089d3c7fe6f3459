"""Parallel sampling (n > 1): one prompt prefill forked to n samples, against every sample prefilling the prompt.

    .venv/bin/python benchmarks/bench_parallel_sampling.py            # nemo50, prompts of 512 and 2048 tokens
    .venv/bin/python benchmarks/bench_parallel_sampling.py --smoke    # seconds (the test uses it)

Scenario: GRPO rollouts. train/rl.py asks for `group_size` completions of each prompt with SamplingParams(n=...).
Per prompt length: one LLM.generate of `--prompts` random prompts × `--n` samples (temperature 1, seeded,
ignore_eos, `--max-tokens` each), on one engine that forks (the default: the first sample prefills, the others
fork its cache, HybridCache.fork: its state copied, its full K/V blocks shared) and one with `engine.fork_samples = False` (every sample prefills its own copy
of the prompt: the engine before forking). Both engines hold the same random-weight model (init_weights, seed 0)
in one process and run interleaved A/B/B/A, `--reps` pairs; cells are medians. Also counted: the prompt tokens
each run feeds the model, the most K/V blocks the sequences held after any step, and whether both engines drew the
same tokens (they must: a fork copies bit for bit the state the sample's own prefill computes).

Predicted, nemo50 fp32 on the 2-vCPU VM (prefill ~8,500 tok/s at 2048, ~1,000 generated tok/s at 32 rows):
4 prompts × 8 samples × 512 tokens is 16,384 prompt tokens without forking (~2 s) and 2,048 with it (~0.25 s),
plus ~1 s of decoding for 32 tokens × 32 rows, so ~2.5× faster end to end; at 2048 tokens prefill dominates
more (65,536 vs 8,192 tokens, ~8 s vs ~1 s), so ~4.5×.

Writes benchmarks/results/parallel_sampling.json and .png.
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

from nemotron3 import SamplingParams
from nemotron3.bench import make_llm


def counted(llm) -> dict[str, list[int]]:
    """Hook the engine's runner: "fed" gets the prompt (non-decode) tokens each step feeds the model, "held" the
    K/V blocks the sequences hold after each step (the pool less its free blocks)."""
    log: dict[str, list[int]] = {"fed": [], "held": []}
    step, cache = llm.engine.runner.step, llm.engine.cache

    def counting_step(segments):
        log["fed"].append(sum(len(s.tokens) for s in segments if not s.decode))
        out = step(segments)
        log["held"].append(cache.num_blocks - len(cache.free_blocks))
        return out

    llm.engine.runner.step = counting_step
    return log


def one_run(llm, log: dict[str, list[int]], prompts: list[list[int]], params: SamplingParams) -> dict:
    for v in log.values():
        v.clear()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    wall = time.perf_counter() - t0
    tokens = [c.token_ids for o in outs for c in o.outputs]
    return {
        "wall_s": wall, "prompt_tokens_fed": sum(log["fed"]), "peak_blocks_held": max(log["held"]),
        "generated": sum(map(len, tokens)), "tokens": tokens,
    }  # fmt: skip


def cell(model, prompt_len: int, args) -> dict:
    """Forked and unforked engines on the same prompts, interleaved A/B/B/A."""
    n_seqs = args.prompts * args.n
    budget = max(args.budget, 16)
    engines = {}
    for fork in (True, False):
        llm, _ = make_llm(model, n_seqs, prompt_len + args.max_tokens + 1, budget)
        llm.engine.fork_samples = fork
        engines[fork] = (llm, counted(llm))
    vocab = model.config.vocab_size
    params = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True, seed=1)
    warm = [C.random_prompt(prompt_len, vocab, 999 + i) for i in range(args.prompts)]
    for llm, fed in engines.values():
        one_run(llm, fed, warm, params)
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for rep in range(args.reps):
        prompts = [C.random_prompt(prompt_len, vocab, 100 * rep + i) for i in range(args.prompts)]
        order = (True, False) if rep % 2 == 0 else (False, True)
        for fork in order:
            runs[fork].append(one_run(*engines[fork], prompts, params))
    same = all(a["tokens"] == b["tokens"] for a, b in zip(runs[True], runs[False]))
    forked, prefilled = (statistics.median(r["wall_s"] for r in runs[f]) for f in (True, False))
    return {
        "prompt_len": prompt_len, "prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens,
        "forked_s": forked, "prefilled_s": prefilled, "speedup": prefilled / forked,
        "forked_runs_s": [r["wall_s"] for r in runs[True]], "prefilled_runs_s": [r["wall_s"] for r in runs[False]],
        "prompt_tokens_fed": {"forked": runs[True][0]["prompt_tokens_fed"],
                              "prefilled": runs[False][0]["prompt_tokens_fed"]},
        "peak_blocks_held": {"forked": max(r["peak_blocks_held"] for r in runs[True]),
                             "prefilled": max(r["peak_blocks_held"] for r in runs[False]),
                             "block_size": engines[True][0].engine.cache.block_size},
        "generated_tokens": runs[True][0]["generated"],
        "tokens_identical": same,
    }  # fmt: skip


def plot(result: dict, path: Path) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    cells = result["cells"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = range(len(cells))
    ax.bar([i - 0.2 for i in x], [c["prefilled_s"] for c in cells], 0.4, label="every sample prefills", color="#999")
    ax.bar([i + 0.2 for i in x], [c["forked_s"] for c in cells], 0.4, label="one prefill, forked", color="#76b900")
    for i, c in enumerate(cells):
        ax.text(i + 0.2, c["forked_s"], f"{c['speedup']:.2f}×", ha="center", va="bottom")
    ax.set_xticks(list(x), [f"{c['prompt_len']}-token prompts" for c in cells])
    ax.set_ylabel("seconds per generate")
    c0 = cells[0]
    ax.set_title(f"{result['model']}: {c0['prompts']} prompts × n={c0['n']}, {c0['max_tokens']} new tokens each")
    ax.legend()
    C.save_png(plt, fig, path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="nemo50", choices=["nemo50", "nemo300", "tiny50"])
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens")
    p.add_argument("--reps", type=int, default=4, help="A/B pairs per prompt length")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny model, short prompts, one pair")
    p.add_argument("--out", default=str(C.RESULTS / "parallel_sampling"), help="path without suffix (.json, .png)")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.prompt_lens, args.prompts, args.n, args.max_tokens, args.reps = "tiny50", [24], 2, 3, 4, 1
    torch.set_num_threads(args.threads)
    model = C.random_model(args.model)
    cells = []
    for n in args.prompt_lens:
        cells.append(cell(model, n, args))
        c = cells[-1]
        fed, same = c["prompt_tokens_fed"], c["tokens_identical"]
        print(f"{args.model} @{n}: forked {c['forked_s']:.2f} s, prefilled {c['prefilled_s']:.2f} s "
              f"({c['speedup']:.2f}×); prompt tokens fed {fed}; peak K/V blocks held {c['peak_blocks_held']}; "
              f"same tokens: {same}", flush=True)  # fmt: skip
    result = {"model": args.model, "threads": args.threads, "budget": args.budget, "cells": cells,
              "machine": C.machine_info()}  # fmt: skip
    return C.write_results(args.out, result, plot)


if __name__ == "__main__":
    main()
