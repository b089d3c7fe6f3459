"""Batched decode step time against batch size: the native decode path up to 64 rows against the old limit of 8.

    .venv/bin/python benchmarks/bench_decode_batch.py                  # nemo50, batches 1 … 64, ~3 min
    .venv/bin/python benchmarks/bench_decode_batch.py --model nemo300  # ~8 min
    .venv/bin/python benchmarks/bench_decode_batch.py --smoke          # seconds (the test uses it)

Until 2026-12-01 the decode program (engine/decode_program.py) and the native GEMV (kernels/cpu_decode.c,
nm3_linear) took at most 8 rows; a step of 9-64 sequences ran op by op, its projections on MKL's GEMM, which
reads a [16 × 512] × [512 × 32,000] lm_head at ~6 GB/s here (11.5 ms against the GEMV's ~4 ms for 8 rows). The
GEMV now goes through the weights block by block for more than 8 rows (256 KiB blocks that stay in L2 while
every group of 8 rows passes), so the weights are read from memory once, and the program takes up to 64 rows.
Setting `native.LINEAR_MAX_ROWS` back to 8 restores the old path exactly (the runner and the GEMV read it per
call), so both run in one process on one engine: per batch size, A/B/B/A, each a `--new`-token greedy generate
of `--batch` random `--prompt`-token prompts, timed as `nemotron3 bench` and bench_engine.py time it
(`nemotron3.bench.timed_generate`: whole engine steps); a cell is the median of each run's steps in which every
sequence decodes (the first two dropped), then the median over runs.

Predicted, nemo50 fp32, 2 threads: the step reads ~120 MB of weights (~6 ms at 20 GB/s) plus per-row work
(~0.4 ms a row: attention over 512 keys, the Mamba state, the experts' rows): 16 rows ~12 ms against the old
29 ms, 32 rows ~19 ms against 38 ms.

Writes benchmarks/results/decode_batch.json and .png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import common as C
import torch

from nemotron3 import LLM
from nemotron3.bench import timed_generate
from nemotron3.kernels import native

NOW = native.LINEAR_MAX_ROWS
OLD = 8  # the limit before


def cell(llm: LLM, batch: int, args) -> dict:
    vocab = llm.engine.model.config.vocab_size
    prompts = [C.random_prompt(args.prompt, vocab, seed=1000 * batch + i) for i in range(batch)]
    runs: dict[int, list[float]] = {OLD: [], NOW: []}
    tokens = {}
    for rep in range(args.reps):
        for limit in (NOW, OLD) if rep % 2 == 0 else (OLD, NOW):
            native.LINEAR_MAX_ROWS = limit
            run = timed_generate(llm, prompts, args.new)
            times = [step.seconds for step in run.decode_steps(batch)]
            tokens[limit] = [o.outputs[0].token_ids for o in run.outputs]
            runs[limit].append(statistics.median(times[2:] or times))
    native.LINEAR_MAX_ROWS = NOW
    old, now = statistics.median(runs[OLD]), statistics.median(runs[NOW])
    return {"batch": batch, "old_ms": 1e3 * old, "now_ms": 1e3 * now, "old_tok_s": batch / old, "now_tok_s": batch / now,
            "speedup": old / now, "runs_ms": {"old": [1e3 * t for t in runs[OLD]], "now": [1e3 * t for t in runs[NOW]]},
            "tokens_identical": tokens[OLD] == tokens[NOW]}  # fmt: skip


def plot(result: dict, path: Path) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    cells = result["cells"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    b = [c["batch"] for c in cells]
    ax.plot(b, [c["old_tok_s"] for c in cells], "o-", color="#999", label=f"native path ≤ {OLD} rows (before)")
    ax.plot(b, [c["now_tok_s"] for c in cells], "o-", color="#76b900", label=f"native path ≤ {NOW} rows (now)")
    for c in cells:
        if c["batch"] > OLD:
            ax.annotate(f"{c['speedup']:.1f}×", (c["batch"], c["now_tok_s"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)  # fmt: skip
    ax.set_xlabel("sequences decoding together")
    ax.set_ylabel("aggregate decode tok/s")
    ax.set_title(f"{result['model']} fp32, {result['threads']} threads, {result['prompt']}-token prompts", fontsize=9)
    ax.set_ylim(0, 1.15 * max(c["now_tok_s"] for c in cells))
    ax.legend(fontsize=8, loc="lower right")
    C.save_png(plt, fig, path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="nemo50", choices=["nemo50", "nemo300", "tiny50"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 9, 12, 16, 24, 32, 48, 64])
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=12, help="tokens per request (decode steps timed: new - 3)")
    p.add_argument("--reps", type=int, default=2, help="A/B pairs per batch size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny model, a few batch sizes, one pair")
    p.add_argument("--out", default=str(C.RESULTS / "decode_batch"), help="path without suffix (.json, .png)")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.batches, args.prompt, args.new, args.reps = "tiny50", [2, 12], 16, 5, 1
    torch.set_num_threads(args.threads)
    model = C.random_model(args.model)
    top = max(args.batches)
    llm = LLM(model, max_num_seqs=top, max_num_batched_tokens=max(512, top * args.prompt),
              max_model_len=args.prompt + args.new + 16, kv_cache_memory_bytes=3 << 30)  # fmt: skip
    result = {"model": args.model, "threads": args.threads, "prompt": args.prompt, "new": args.new, "reps": args.reps,
              "machine": C.machine_info(), "cells": []}  # fmt: skip
    for batch in args.batches:
        c = cell(llm, batch, args)
        result["cells"].append(c)
        print(f"{args.model} batch {batch:3d}: step {c['old_ms']:7.2f} → {c['now_ms']:7.2f} ms ({c['speedup']:.2f}×), "
              f"{c['old_tok_s']:7.1f} → {c['now_tok_s']:7.1f} tok/s; same tokens: {c['tokens_identical']}", flush=True)  # fmt: skip
    return C.write_results(args.out, result, plot)


if __name__ == "__main__":
    main()
