"""MTP speculative decoding: decode tok/s at batch 1 for k = 0 (plain), 1, 2, 3, 5 drafts, in one run.

    .venv/bin/python benchmarks/bench_speculative.py           # full run, ~5-10 min on the 2-vCPU machine
    .venv/bin/python benchmarks/bench_speculative.py --smoke   # seconds (the test uses it)

Models: (a) the trained default model (`nemotron3.load_model("default")`, one MTP block trained with the
MTP loss) on prompts of its domain — Shakespeare speaker cues and chat-formatted arithmetic questions —
and (b) the same architecture with random weights (init_weights, seed 0) on random prompt ids, where
drafts are almost never accepted and the drafting + verification overhead shows.

Method: greedy, ignore_eos, `--tokens` new tokens per request, one request at a time (batch 1). Each rep
runs every (model, k) cell once per prompt, the order of k rotated every rep (interleaved A/B/C…), and
cells report medians over reps × prompts. Decode tok/s = (new tokens − 1) / (finish time − first-token
time) from RequestMetrics, i.e. prefill excluded; `cpu_tok_s` is new tokens / thread CPU time of the whole
generate call (prefill included), which is less sensitive to other processes on the machine. Every k's
greedy output is checked token-for-token against k = 0. Acceptance: mean tokens per verify step (accepted
drafts + 1) and acceptance rate per draft position, from the engine's counters; draft / verify ms per
step. The rollback section compares the two Mamba state rollbacks at k = 3 on the default model.

Writes benchmarks/results/speculative.json and speculative.png.
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
from nemotron3.engine.outputs import SpecDecodeMetrics
from nemotron3.model import NemotronHForCausalLM

QUESTIONS = ["What is 17 + 25?", "What is 348 + 576?", "Compute 64 - 29.", "What is 12 * 7?"]
SPEAKERS = ["ROMEO:\n", "KING HENRY:\n", "JULIET:\n", "HAMLET:\n"]


def prompts_default(llm: LLM, n: int) -> list[list[int]]:
    tok = llm.get_tokenizer()
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True) for q in QUESTIONS]
    texts = [t for pair in zip(SPEAKERS, chats) for t in pair][:n]
    return [tok.encode(t) for t in texts]


def make_llm(model: NemotronHForCausalLM, k: int, tokenizer, rollback: str = "select") -> LLM:
    spec = None if k == 0 else {"method": "mtp", "num_speculative_tokens": k, "rollback": rollback}
    return LLM(model, tokenizer=tokenizer, speculative_config=spec, max_num_seqs=1, kv_cache_memory_bytes=64 << 20)


def fresh_stats(llm: LLM) -> None:
    k = getattr(llm.engine, "k", 0)
    if k:
        llm.engine.stats = SpecDecodeMetrics(drafted_per_position=[0] * k, accepted_per_position=[0] * k)


def run_one(llm: LLM, prompt: list[int], new: int) -> dict:
    sp = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    c0 = time.thread_time()
    out = llm.generate({"prompt_token_ids": prompt}, sp)[0]
    cpu = time.thread_time() - c0
    m = out.metrics
    decode_s = m.finished_time - m.first_token_time
    ids = out.outputs[0].token_ids
    return {"ids": ids, "decode_tok_s": (len(ids) - 1) / decode_s, "cpu_tok_s": len(ids) / cpu}


def bench_model(name: str, model, tokenizer, prompts, ks, reps: int, new: int) -> dict:
    llms = {k: make_llm(model, k, tokenizer) for k in ks}
    for k in ks:  # warm-up: first-call allocations and lazy inits
        run_one(llms[k], prompts[0], min(new, 8))
        fresh_stats(llms[k])
    raw = {k: {"decode_tok_s": [], "cpu_tok_s": []} for k in ks}
    ids = {}  # (k, prompt) → greedy output
    load = []
    for rep in range(reps):
        order = ks[rep % len(ks) :] + ks[: rep % len(ks)]
        load.append(C.foreign_load(0.2))
        for k in order:
            for i, p in enumerate(prompts):
                r = run_one(llms[k], p, new)
                raw[k]["decode_tok_s"].append(r["decode_tok_s"])
                raw[k]["cpu_tok_s"].append(r["cpu_tok_s"])
                ids.setdefault((k, i), r["ids"])
    identical = {k: all(ids[(k, i)] == ids[(ks[0], i)] for i in range(len(prompts))) for k in ks}
    base = statistics.median(raw[ks[0]]["decode_tok_s"])
    base_cpu = statistics.median(raw[ks[0]]["cpu_tok_s"])
    cells = {}
    for k in ks:
        dec, cpu = statistics.median(raw[k]["decode_tok_s"]), statistics.median(raw[k]["cpu_tok_s"])
        cell = {
            "decode_tok_s": dec, "speedup": dec / base, "cpu_tok_s": cpu, "cpu_speedup": cpu / base_cpu,
            "greedy_identical_to_k0": identical[k], "raw": raw[k],
        }  # fmt: skip
        st = getattr(llms[k].engine, "stats", None)
        if st is not None and st.num_steps:
            cell.update(
                mean_acceptance_length=st.mean_acceptance_length,
                acceptance_rate_per_position=st.acceptance_rate_per_position,
                draft_acceptance_rate=st.draft_acceptance_rate,
                draft_ms_per_step=1e3 * st.draft_time / st.num_steps,
                verify_ms_per_step=1e3 * st.verify_time / st.num_steps,
                verify_steps=st.num_steps,
            )
        else:
            cell.update(mean_acceptance_length=1.0)
        cells[str(k)] = cell
    print(f"[{name}]")
    for k, c in cells.items():
        acc = c.get("acceptance_rate_per_position")
        print(
            f"  k={k}: {c['decode_tok_s']:7.1f} tok/s  x{c['speedup']:.2f}  (cpu x{c['cpu_speedup']:.2f})  "
            f"accept len {c['mean_acceptance_length']:.2f}  "
            + (f"per-pos {[round(a, 2) for a in acc]}  " if acc else "")
            + ("" if c["greedy_identical_to_k0"] else "  NOT IDENTICAL")
        )
    return {"k": cells, "prompts": len(prompts), "foreign_cpus": load}


def bench_rollback(model, tokenizer, prompts, reps: int, new: int, k: int = 3) -> dict:
    llms = {rb: make_llm(model, k, tokenizer, rb) for rb in ("select", "recompute")}
    raw = {rb: [] for rb in llms}
    fix = {rb: [] for rb in llms}
    for rb, llm in llms.items():
        run_one(llm, prompts[0], min(new, 8))
    for rep in range(reps):
        for rb in ["select", "recompute"] if rep % 2 == 0 else ["recompute", "select"]:
            llm = llms[rb]
            fresh_stats(llm)
            t_fix = _time_rollback(llm)
            for p in prompts:
                raw[rb].append(run_one(llm, p, new)["decode_tok_s"])
            fix[rb].append(1e3 * t_fix["s"] / max(1, t_fix["n"]))
            _untime_rollback(llm)
    out = {
        rb: {"decode_tok_s": statistics.median(raw[rb]), "rollback_ms_per_step": statistics.median(fix[rb])}
        for rb in llms
    }
    print(
        f"[rollback k={k}] select {out['select']['decode_tok_s']:.1f} tok/s ({out['select']['rollback_ms_per_step']:.3f} "
        f"ms/step)  recompute {out['recompute']['decode_tok_s']:.1f} tok/s "
        f"({out['recompute']['rollback_ms_per_step']:.3f} ms/step)"
    )
    return {"k": k, **out}


def _time_rollback(llm: LLM) -> dict:
    """Wrap the engine's rollback (state selection, or restore + recompute) to time it."""
    eng, acc = llm.engine, {"s": 0.0, "n": 0}
    inner = type(eng)._rollback

    def timed(*args):
        t = time.perf_counter()
        inner(eng, *args)
        acc["s"] += time.perf_counter() - t
        acc["n"] += 1

    eng._rollback = timed
    return acc


def _untime_rollback(llm: LLM) -> None:
    llm.engine.__dict__.pop("_rollback", None)


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG (pip install -e .[bench])")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, res in results["models"].items():
        ks = sorted(int(k) for k in res["k"])
        axes[0].plot(ks, [res["k"][str(k)]["decode_tok_s"] for k in ks], "o-", label=name)
        axes[1].plot(ks, [res["k"][str(k)]["mean_acceptance_length"] for k in ks], "o-", label=name)
    axes[1].plot([0, 5], [1, 6], ":", color="grey", label="all drafts accepted")
    axes[0].set(xlabel="num_speculative_tokens k", ylabel="decode tok/s (batch 1, median)", title="decode speed")
    axes[1].set(xlabel="num_speculative_tokens k", ylabel="tokens per verify step", title="mean acceptance length")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny run (k = 0, 1, 2; 1 rep; few tokens)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=96, help="new tokens per request")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: see docs/speculative.md)")
    ap.add_argument("--out", type=Path, default=C.RESULTS / "speculative.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = [0, 1, 2] if args.smoke else [0, 1, 2, 3, 5]
    reps, new, n_prompts = (1, 8, 2) if args.smoke else (args.reps, args.tokens, args.prompts)

    trained = LLM("default", max_num_seqs=1, kv_cache_memory_bytes=1 << 20)  # the embedded checkpoint + tokenizer
    tokenizer, default = trained.get_tokenizer(), trained.model
    random_model = NemotronHForCausalLM(default.config)
    random_model.init_weights(torch.Generator().manual_seed(0))
    random_model.eval()
    g = torch.Generator().manual_seed(1)
    V = default.config.vocab_size
    random_prompts = [torch.randint(5, V, (int(n),), generator=g).tolist() for n in (8, 24, 12, 40)[:n_prompts]]

    t0 = time.perf_counter()
    results = {
        "machine": {**C.machine_info(), "torch_threads": args.threads},
        "settings": {"reps": reps, "new_tokens": new, "prompts": n_prompts, "ks": ks, "batch": 1, "greedy": True},
        "models": {
            "default (trained)": bench_model(
                "default (trained)", default, tokenizer, prompts_default(trained, n_prompts), ks, reps, new
            ),
            "random weights": bench_model("random weights", random_model, None, random_prompts, ks, reps, new),
        },
    }
    results["rollback"] = bench_rollback(
        default, tokenizer, prompts_default(trained, n_prompts), max(1, reps // 2 + 1), new
    )
    results["seconds"] = time.perf_counter() - t0
    C.write_json(args.out, results)
    print(f"wrote {args.out}")
    plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
