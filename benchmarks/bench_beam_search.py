"""Beam search: nemotron3's `LLM.beam_search` against transformers' `generate(num_beams=k)` on the same weights.

    .venv/bin/python benchmarks/bench_beam_search.py            # nemo50, 512-token prompts, 4 beams, 32 tokens
    .venv/bin/python benchmarks/bench_beam_search.py --smoke    # seconds (the test uses it)

Scenarios: `--prompts` sizes (default 1 and 4 prompts of `--prompt-len` random tokens), `--beams` beams,
`--max-tokens` new tokens, no end of sequence (ignore_eos; transformers: eos_token_id=None), early_stopping="never"
on transformers' side, which ranks as ours does, so both return the same sequences (checked, `tokens_identical`).
Both engines hold the same random weights (our init_weights, seed 0, copied into transformers' model) in one
process; repetitions alternate A/B/B/A after one warm-up each; cells are medians of wall time per call.

Predicted, nemo50 fp32, 2 threads, one 512-token prompt, 4 beams, 32 tokens: transformers copies the prompt to
every beam before its forward, so it prefills 4 × 512 tokens (~0.7 s at its ~2,900 tok/s) and decodes 32 steps of
4 rows (~25 ms each, 0.8 s): ~1.5 s. Ours prefills the prompt once (~0.09 s at ~6,000 tok/s) and the beams fork
its cache; 32 steps of 4 rows (~7 ms) plus the selection (~1 ms a step): ~0.35 s, ~4×.

Writes benchmarks/results/beam_search.json and .png.
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

from nemotron3 import LLM, BeamSearchParams


def hf_twin(model):
    """transformers' NemotronH holding our model's weights."""
    from transformers import NemotronHForCausalLM as HFModel

    hf = HFModel(C.hf_config(model.config)).eval()
    hf.load_state_dict({k.replace("backbone.", "model.", 1): v for k, v in model.state_dict().items()})
    return hf


def ours(llm: LLM, prompts: list[list[int]], args) -> list[list[list[int]]]:
    params = BeamSearchParams(beam_width=args.beams, max_tokens=args.max_tokens, ignore_eos=True)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    return [[s.tokens[len(p) :] for s in o.sequences] for p, o in zip(prompts, outs)]


def theirs(hf, prompts: list[list[int]], args) -> list[list[list[int]]]:
    with torch.inference_mode():
        out = hf.generate(torch.tensor(prompts), num_beams=args.beams, num_return_sequences=args.beams,
                          do_sample=False, max_new_tokens=args.max_tokens, eos_token_id=None, pad_token_id=0,
                          early_stopping="never")  # fmt: skip
    rows = out[:, len(prompts[0]) :].tolist()
    return [rows[i * args.beams : (i + 1) * args.beams] for i in range(len(prompts))]


def scenario(engines: dict, n_prompts: int, args) -> dict:
    """Both engines on n_prompts prompts over args.reps repetitions (A/B/B/A), after one warm-up each."""
    vocab = engines["ours"][0].engine.model.config.vocab_size
    prompts = [C.random_prompt(args.prompt_len, vocab, seed=50 + i) for i in range(n_prompts)]
    times: dict[str, list[float]] = {"ours": [], "transformers": []}
    tokens = {}
    for name, (engine, run) in engines.items():
        tokens[name] = run(engine, prompts, args)  # warm-up, and the tokens compared
    for rep in range(args.reps):
        for name in ("ours", "transformers") if rep % 2 == 0 else ("transformers", "ours"):
            engine, run = engines[name]
            t0 = time.perf_counter()
            run(engine, prompts, args)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"prompts": n_prompts, "times_s": times, "ours_s": med["ours"], "transformers_s": med["transformers"],
            "speedup": med["transformers"] / med["ours"], "tokens_identical": tokens["ours"] == tokens["transformers"]}  # fmt: skip


def plot(result: dict, path: Path) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.6))
    cells = result["scenarios"]
    x = range(len(cells))
    ax.bar([i - 0.2 for i in x], [c["transformers_s"] for c in cells], 0.4, label="transformers 5.23", color="#999")
    ax.bar([i + 0.2 for i in x], [c["ours_s"] for c in cells], 0.4, label="nemotron3", color="#76b900")
    for i, c in zip(x, cells):
        ax.text(i + 0.2, c["ours_s"], f"{c['speedup']:.1f}×", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(list(x))
    ax.set_xticklabels([f"{c['prompts']} prompt{'s' * (c['prompts'] > 1)}" for c in cells])
    ax.set_ylabel("wall time per call (s)")
    ax.set_title(f"{result['model']}: beam search, {result['beams']} beams, {result['prompt_len']}-token prompts, "
                 f"{result['max_tokens']} tokens", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8)
    C.save_png(plt, fig, path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="nemo50", choices=["nemo50", "nemo300", "tiny50"])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--prompts", type=int, nargs="+", default=[1, 4], help="scenario sizes (prompts per call)")
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=4, help="repetitions (alternating A/B/B/A)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny model, short prompts, one repetition")
    p.add_argument("--out", default=str(C.RESULTS / "beam_search"), help="path without suffix (.json, .png)")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.prompt_len, args.prompts, args.max_tokens, args.reps = "tiny50", 24, [1, 2], 6, 1
    torch.set_num_threads(args.threads)
    model = C.random_model(args.model)
    longest = args.prompt_len + args.max_tokens + 16
    llm = LLM(model, max_num_seqs=max(args.prompts) * args.beams, max_num_batched_tokens=max(512, args.prompt_len),
              max_model_len=longest, kv_cache_memory_bytes=1 << 30)  # fmt: skip
    engines = {"ours": (llm, ours), "transformers": (hf_twin(model), theirs)}
    result = {"model": args.model, "threads": args.threads, "prompt_len": args.prompt_len, "beams": args.beams,
              "max_tokens": args.max_tokens, "reps": args.reps, "machine": C.machine_info(), "scenarios": []}  # fmt: skip
    for n in args.prompts:
        res = scenario(engines, n, args)
        result["scenarios"].append(res)
        print(f"{args.model} {n} prompt(s) × {args.beams} beams × {args.max_tokens} tokens: transformers "
              f"{res['transformers_s']:.3f} s, ours {res['ours_s']:.3f} s ({res['speedup']:.2f}×); same tokens: "
              f"{res['tokens_identical']}", flush=True)  # fmt: skip
    return C.write_results(args.out, result, plot)


if __name__ == "__main__":
    main()
