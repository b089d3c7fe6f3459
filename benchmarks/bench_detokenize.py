"""Detokenization per decode step: decoding every generated token again against IncrementalDetokenizer.

    .venv/bin/python benchmarks/bench_detokenize.py            # default tokenizer, outputs up to 4,096 tokens
    .venv/bin/python benchmarks/bench_detokenize.py --smoke    # the test's run

The engine turns each sequence's tokens into text at every step (stop strings and streaming need it). Decoding
the whole output each step costs O(length) per step; the incremental detokenizer decodes the tokens since the
last step with their left neighbour as context. Here both write the text of one output token by token, for
outputs of growing length (tokens of real text: README.md and docs/ encoded with the default tokenizer), in one
process, interleaved, `--reps` times; cells are the medians of the total time over the output and of the
time for the output's last token, and the same cost for 32 sequences per step (32 × the last-token time).
Both must write the same final text (checked). Writes benchmarks/results/detokenize.json.

Predicted from one decode call (142 µs at 1,000 tokens, 573 µs at 4,000 here: ~0.14 µs per token): the whole
decode costs ~0.07 µs × length² over an output, ~1.2 s at 4,096 tokens, and ~18 ms per step for 32 sequences at
4,000 tokens (a nemo50 32-row decode step is ~30 ms); the incremental one two short decodes per step, ~10 µs.
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

from nemotron3.default_model import resolve_model
from nemotron3.engine.detokenizer import IncrementalDetokenizer
from nemotron3.io.tokenizer import Tokenizer


def corpus_ids(tok: Tokenizer, n: int) -> list[int]:
    text = "".join(p.read_text() for p in [C.ROOT.parent / "README.md", *sorted((C.ROOT.parent / "docs").glob("*.md"))])
    ids = tok.encode(text)
    if len(ids) < n:
        ids = ids * (n // len(ids) + 1)
    return ids[:n]


def whole(tok: Tokenizer, ids: list[int]) -> tuple[float, float, str]:
    """Decode ids[:n] for every n, as the engine did: (total seconds, seconds of the last step, final text)."""
    out: list[int] = []  # the sequence's output list, one token longer each step
    t0 = last = time.perf_counter()
    text = ""
    for t in ids:
        last = time.perf_counter()
        out.append(t)
        text = tok.decode(out)
    end = time.perf_counter()
    return end - t0, end - last, text


def incremental(tok: Tokenizer, ids: list[int]) -> tuple[float, float, str]:
    d, out = IncrementalDetokenizer(tok), []
    t0 = last = time.perf_counter()
    for t in ids:
        last = time.perf_counter()
        out.append(t)
        d.add(out, final=len(out) == len(ids))
    end = time.perf_counter()
    return end - t0, end - last, d.text


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=str(C.RESULTS / "detokenize.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.lengths, args.reps = [64], 1
    tok = Tokenizer.from_dir(resolve_model("default"))
    cells = []
    for n in args.lengths:
        ids = corpus_ids(tok, n)
        runs = {"whole": [], "incremental": []}
        for rep in range(args.reps):
            order = ("whole", "incremental") if rep % 2 == 0 else ("incremental", "whole")
            for name in order:
                runs[name].append((whole if name == "whole" else incremental)(tok, ids))
        texts = {r[2] for rs in runs.values() for r in rs}
        cell = {"tokens": n, "same_text": len(texts) == 1}
        for name, rs in runs.items():
            cell[f"{name}_total_s"] = statistics.median(r[0] for r in rs)
            cell[f"{name}_last_step_us"] = 1e6 * statistics.median(r[1] for r in rs)
            cell[f"{name}_32_seqs_step_ms"] = 32e3 * statistics.median(r[1] for r in rs)
        cell["speedup_total"] = cell["whole_total_s"] / cell["incremental_total_s"]
        cells.append(cell)
        print(f"{n:5d} tokens: whole {cell['whole_total_s']:.3f} s ({cell['whole_last_step_us']:.0f} µs last step), "
              f"incremental {cell['incremental_total_s']:.3f} s ({cell['incremental_last_step_us']:.0f} µs); "
              f"{cell['speedup_total']:.0f}×; same text: {cell['same_text']}", flush=True)  # fmt: skip
    result = {"tokenizer": "default", "vocab_size": tok.vocab_size, "cells": cells, "machine": C.machine_info()}
    C.write_json(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
