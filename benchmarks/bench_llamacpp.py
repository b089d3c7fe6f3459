"""nemotron3's engine against llama.cpp on the same float32 weights, interleaved process by process.

    .venv/bin/python benchmarks/bench_llamacpp.py                          # llama-cpp-python in this venv
    .venv/bin/python benchmarks/bench_llamacpp.py --llama-python /path/venv/bin/python
    .venv/bin/python benchmarks/bench_llamacpp.py --quick                  # 2 reps, no 32k pair (~6 min)

The issue's bar for batch-1 decode is llama.cpp (research/perf.md §4: ~190 tok/s on nemo50). llama.cpp runs
NemotronH LatentMoE models as `nemotron_h_moe`. Install it with
`CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36` (a ~5 min source build on 2 cores).
Writes benchmarks/results/llamacpp.json (+ llamacpp.png with matplotlib). Method:

* Weights: transformers' random init under manual_seed(0) (as bench_engine.py), loaded by our engine, and
  written by gguf_export.py as a float32 GGUF that llama.cpp loads. Both engines run the same tensors; the
  greedy tokens of (a) are compared.
* Every measurement is its own process (ours: bench_engine.py's workers; llama.cpp: llamacpp_worker.py),
  the two engines alternating A/B/B/A, 2 threads each; cells are medians over reps. llama.cpp decodes with
  flash attention off (its faster decode here: 3.4 vs 4.1 ms per nemo50 step at 512, 7.3 vs 14-19 ms at
  16k) and prefills with its default (auto: 0.9 vs 1.0 s at 2048).
* (a) batch-1 decode after the same 512-token prompt, 33 greedy tokens, median of the steps after the
  first 2. Ours: `LLMEngine.step()` wall time. llama.cpp: one `llama_decode` plus a numpy argmax.
* (a') the same with bfloat16 matrices: ours `weight_dtype="bfloat16"` (matrices stored in bf16, widened in
  the kernels), llama.cpp a GGUF whose same tensors are BF16 (gguf_export.py matrices="bf16").
* (b) aggregate decode of nemo50 with 8 and 32 concurrent 512-token requests: batch / the median time of
  the steps where all of them decode. Ours: one `LLM.generate` (continuous batching). llama.cpp: one context
  with a sequence per request, each prefilled, then one `llama_decode` of all of them per step.
* (c) batch-1 prefill of 2048 tokens: median of 3 calls after a warm-up. Ours: `LLM.generate(max_tokens=1)`
  with a 2048-token budget. llama.cpp: 512-token `llama_decode` batches, its default micro-batch.
* (d) nemo50 decode at 512 and 32k context in one process, alternating blocks of 4 steps (bench_engine's
  w_context_pair): the growth ratio. float32 K/V in both, then our bfloat16 pool beside llama.cpp's f16 one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import common as C

MODELS = ("nemo50", "nemo300")
PAIR = {"model": "nemo50", "base": 512, "prompt": 32768, "block": 4, "blocks": 12}
KV_PAIRS = {  # label: (llama.cpp K/V type, our kv_cache_dtype)
    "fp32 K/V": ("f32", "auto"),
    "half K/V (bf16 / f16)": ("f16", "bfloat16"),
}
# llama.cpp's flash attention per scenario: its faster setting here (llamacpp_worker.py's docstring)
FLASH_ATTN = {"decode": "off", "concurrency": "off", "context_pair": "off", "prefill": "auto"}


def plan(mode: str) -> dict:
    full = {"models": list(MODELS), "reps": 4, "dec_prompt": 512, "bf16": True, "conc": [8, 32],
            "prefill": 2048, "prefill_calls": 3, "pair": dict(PAIR), "pair_reps": 2, "worker_timeout": 560,
            "quiet_wait_s": 20}  # fmt: skip
    if mode == "quick":
        return {**full, "reps": 2, "pair": None, "quiet_wait_s": 10}
    if mode == "smoke":  # tiny configs: checks the plumbing in seconds
        pair = {**PAIR, "model": "tiny50", "base": 32, "prompt": 128, "blocks": 2}
        return {"models": ["tiny50"], "reps": 1, "dec_prompt": 64, "bf16": True, "conc": [4], "prefill": 64,
                "prefill_calls": 1, "pair": pair, "pair_reps": 1, "worker_timeout": 120,
                "quiet_wait_s": 0}  # fmt: skip
    return full


def llama_available(python: str) -> str | None:
    """llama-cpp-python's version under `python`, or None when it cannot be imported there."""
    try:
        probe = subprocess.run(
            [python, "-c", "import llama_cpp, numpy; print(llama_cpp.__version__)"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:  # no such interpreter
        return None
    return probe.stdout.strip() if probe.returncode == 0 else None


def export_in_subprocess(name: str, weights: Path, gguf: Path, matrices: str = "f32") -> Path:
    """Our model over `weights`, written as a GGUF by gguf_export.py (matrices "f32" or "bf16"), in a child
    process (the parent holds no model)."""
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); import common, gguf_export; "
        f"gguf_export.export_gguf(common.load_ours({name!r}, common.Path({str(weights)!r})), {str(gguf)!r}, "
        f"{matrices!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    return gguf


class Runner:
    """Runs one engine's worker process per call and keeps every raw result."""

    def __init__(self, files: dict, llama_python: str, P: dict, log):
        self.files, self.llama_python, self.P, self.log = files, llama_python, P, log
        self.raw: list[dict] = []

    def run(self, engine: str, **spec) -> dict:
        name = spec["model"]
        vocab = C.config(name).vocab_size
        if engine == "ours":
            spec = {**spec, "engine": "ours", "weights": self.files[name]["weights"]}
            res = C.run_worker(HERE / "bench_engine.py", spec, self.P["worker_timeout"], self.P["quiet_wait_s"])
        else:
            spec = {"kv": "f32", "flash_attn": FLASH_ATTN[spec["scenario"]], **spec, "engine": "llama.cpp",
                    "gguf": self.files[name][spec.get("matrices", "f32")], "vocab": vocab,
                    "threads": C.THREADS}  # fmt: skip
            res = C.run_worker(
                HERE / "llamacpp_worker.py", spec, self.P["worker_timeout"], self.P["quiet_wait_s"], self.llama_python
            )
        res.setdefault("spec", {k: v for k, v in spec.items() if k != "prompt_ids"})
        res["engine"] = engine
        self.raw.append(res)
        hidden = ("weights", "gguf", "prompt_ids", "vocab")
        label = " ".join(f"{k}={v}" for k, v in spec.items() if k not in hidden)
        if "error" in res:
            self.log(f"  {engine} {label}: ERROR {res['error'][:300]}")
        else:
            value = res.get("median_ms") or res.get("tok_s") or res.get("growth")
            self.log(f"  {engine} {label}: {value:.3f} ({res.get('process_wall_s', 0):.1f} s)")
        return res

    def pair(self, rep: int, ours: dict, llama: dict) -> tuple[dict, dict]:
        """One A/B pair, the order flipped every rep."""
        order = ("ours", "llama.cpp") if rep % 2 == 0 else ("llama.cpp", "ours")
        out = {e: self.run(e, **(ours if e == "ours" else llama)) for e in order}
        return out["ours"], out["llama.cpp"]


def _ok(results: list[dict], key: str) -> list[float]:
    return [r[key] for r in results if "error" not in r and r.get(key) is not None]


def cell(ours: list[dict], llama: list[dict], key: str, higher_is_better: bool) -> dict:
    """Both engines' values and medians, the ratio of the medians and the per-pair ratios (ours faster > 1)."""
    a, b = _ok(ours, key), _ok(llama, key)
    pairs = [(x[key], y[key]) for x, y in zip(ours, llama) if "error" not in x and "error" not in y]
    ratios = [(x / y if higher_is_better else y / x) for x, y in pairs if x and y]
    ma, mb = C.median(a), C.median(b)
    speedup = None if not (ma and mb) else (ma / mb if higher_is_better else mb / ma)
    return {"ours": a, "llama.cpp": b, "ours_median": ma, "llama_median": mb, "ours_speedup": speedup,
            "paired_speedups": ratios, "errors": [r["error"] for r in ours + llama if "error" in r]}  # fmt: skip


def run_all(r: Runner, P: dict) -> dict:
    results: dict = {"decode_b1": {}, "concurrency": {}, "prefill": {}, "context_pair": {}}
    for matrices in ("f32", "bf16") if P["bf16"] else ("f32",):
        for name in P["models"]:
            vocab = C.config(name).vocab_size
            prompt = C.random_prompt(P["dec_prompt"], vocab, seed=100)  # the prompt bench_engine's w_decode makes
            ours = {"scenario": "decode", "model": name, "batch": 1, "prompt": len(prompt)}
            llama = {**ours, "prompt_ids": prompt, "new": 33, "drop": 2, "matrices": matrices}
            if matrices == "bf16":
                ours["weight_dtype"] = "bfloat16"
            runs = [r.pair(i, ours, llama) for i in range(P["reps"])]
            c = cell([x for x, _ in runs], [y for _, y in runs], "median_ms", higher_is_better=False)
            agree = [x.get("tokens") == y.get("tokens") for x, y in runs if "error" not in x and "error" not in y]
            c["greedy_tokens_identical"] = bool(agree) and all(agree)
            elt = 2 if matrices == "bf16" else 4
            c["bytes_per_step"] = C.decode_bytes(C.config(name), len(prompt), matrix_elt=elt)["total"]
            results["decode_b1"][name if matrices == "f32" else f"{name} bf16"] = c
    name = P["models"][0]  # nemo50 (tiny50 in the smoke run)
    for B in P["conc"]:
        spec = {"model": name, "batch": B, "prompt": P["dec_prompt"]}
        ours = {**spec, "scenario": "decode"}
        llama = {**spec, "scenario": "concurrency", "new": 33, "drop": 2}
        runs = [r.pair(i, ours, llama) for i in range(P["reps"])]
        results["concurrency"][f"{name} x{B}"] = cell([x for x, _ in runs], [y for _, y in runs], "tok_s", True)
    for name in P["models"]:
        spec = {"scenario": "prefill", "model": name, "prompt": P["prefill"], "calls": P["prefill_calls"]}
        runs = [r.pair(i, spec, spec) for i in range(P["reps"])]
        results["prefill"][name] = cell([x for x, _ in runs], [y for _, y in runs], "tok_s", higher_is_better=True)
    if P["pair"]:
        for label, (llama_kv, our_kv) in KV_PAIRS.items():
            spec = {"scenario": "context_pair", **P["pair"]}
            runs = [
                r.pair(i, {**spec, "kv_cache_dtype": our_kv}, {**spec, "kv": llama_kv}) for i in range(P["pair_reps"])
            ]
            ours, llama = [x for x, _ in runs], [y for _, y in runs]
            results["context_pair"][label] = {
                "growth": cell(ours, llama, "growth", higher_is_better=False),
                "base_ms": cell(ours, llama, "base_ms", higher_is_better=False),
                "long_ms": cell(ours, llama, "long_ms", higher_is_better=False),
            }  # fmt: skip
    return results


def summary_lines(data: dict) -> list[str]:
    res, out = data["results"], []
    for name, c in res["decode_b1"].items():
        out.append(
            f"decode b1 {name}: ours {C.fmt(c['ours_median'], 2)} ms, llama.cpp {C.fmt(c['llama_median'], 2)} ms "
            f"-> ours {C.fmt(c['ours_speedup'], 2)}x (pairs {', '.join(C.fmt(x, 2) for x in c['paired_speedups'])}); "
            f"greedy tokens identical: {c['greedy_tokens_identical']}"
        )
    for name, c in res["concurrency"].items():
        out.append(
            f"concurrent {name}: ours {C.fmt(c['ours_median'], 0)} tok/s, llama.cpp {C.fmt(c['llama_median'], 0)} "
            f"-> ours {C.fmt(c['ours_speedup'], 2)}x"
        )
    for name, c in res["prefill"].items():
        out.append(
            f"prefill {data['plan']['prefill']} {name}: ours {C.fmt(c['ours_median'], 0)} tok/s, llama.cpp "
            f"{C.fmt(c['llama_median'], 0)} -> ours {C.fmt(c['ours_speedup'], 2)}x"
        )
    for kv, c in res["context_pair"].items():
        g, b, l_ = c["growth"], c["base_ms"], c["long_ms"]
        out.append(
            f"context 32k vs 512, {kv}: growth ours {C.fmt(g['ours_median'], 3)}, llama.cpp "
            f"{C.fmt(g['llama_median'], 3)}; base ms {C.fmt(b['ours_median'], 2)} / {C.fmt(b['llama_median'], 2)}, "
            f"long ms {C.fmt(l_['ours_median'], 2)} / {C.fmt(l_['llama_median'], 2)}"
        )
    return out


def plot(data: dict, path: Path) -> bool:
    """Bars: decode tok/s, prefill tok/s and the context growth, ours beside llama.cpp."""
    plt = C.pyplot()
    if plt is None:
        return False
    res = data["results"]
    both = lambda c: c["ours_median"] and c["llama_median"]
    panels = [
        ("batch-1 decode tok/s @512", {n: (1e3 / c["ours_median"], 1e3 / c["llama_median"])
                                       for n, c in res["decode_b1"].items() if both(c)}),
        ("aggregate decode tok/s, N concurrent", {n: (c["ours_median"], c["llama_median"])
                                                   for n, c in res.get("concurrency", {}).items() if both(c)}),
        (f"prefill tok/s @{data['plan']['prefill']}", {n: (c["ours_median"], c["llama_median"])
                                                      for n, c in res["prefill"].items() if both(c)}),
        ("decode time 32k / 512 (one process)", {kv: (c["growth"]["ours_median"], c["growth"]["llama_median"])
                                                 for kv, c in res["context_pair"].items() if both(c["growth"])}),
    ]  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, (title, vals) in zip(axes, panels):
        names = list(vals)
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [vals[n][0] for n in names], 0.4, label="nemotron3")
        ax.bar([x + 0.2 for x in xs], [vals[n][1] for n in names], 0.4, label="llama.cpp")
        ax.set_xticks(list(xs), [n.replace(" ", "\n", 1) for n in names], fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].legend()
    fig.suptitle(f"nemotron3 vs llama.cpp, same weights, 2 threads ({data['date']})", fontsize=10)
    C.save_png(plt, fig, path)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="2 reps, no 32k context pair")
    g.add_argument("--smoke", action="store_true", help="tiny config, 1 rep")
    p.add_argument(
        "--llama-python", default=sys.executable, help="interpreter with llama-cpp-python (default: this one)"
    )
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--from-json", type=Path, default=None, help="redraw the PNG and summary from a llamacpp.json")
    args = p.parse_args(argv)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        print("\n".join(summary_lines(data)))
        if not args.no_plot:
            png = (args.out or args.from_json.parent) / "llamacpp.png"
            print(f"wrote {png}" if plot(data, png) else "no PNG: matplotlib is not installed")
        return 0
    version = llama_available(args.llama_python)
    if version is None:
        print(
            f"error: --llama-python {args.llama_python}: cannot import llama_cpp and numpy there; install "
            'llama-cpp-python==0.3.36 (CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36)',
            file=sys.stderr,
        )
        return 2
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    P = plan(mode)
    if args.reps:
        P["reps"] = args.reps
    out = args.out or C.RESULTS
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="nemotron3-llamacpp-"))
    try:
        files = {}
        for name in sorted(set(P["models"]) | ({P["pair"]["model"]} if P["pair"] else set())):
            log(f"weights {name}: transformers random init (seed 0), then our GGUF export")
            weights = C.make_weights_in_subprocess(name, tmp / f"{name}.safetensors")
            files[name] = {"weights": str(weights)}
            for matrices in ("f32", "bf16") if P["bf16"] else ("f32",):
                gguf = tmp / f"{name}-{matrices}.gguf"
                files[name][matrices] = str(export_in_subprocess(name, weights, gguf, matrices))
        r = Runner(files, args.llama_python, P, log)
        results = run_all(r, P)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data = {
        "benchmark": "nemotron3 engine vs llama.cpp, same fp32 weights",
        "mode": mode, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": C.machine_info(),
        "llama_cpp_python": version, "method": __doc__, "plan": P, "results": results, "raw": r.raw,
        "total_s": time.perf_counter() - t0,
    }  # fmt: skip
    png = out / "llamacpp.png"
    data["png"] = str(png) if not args.no_plot and plot(data, png) else None
    C.write_json(out / "llamacpp.json", data)
    print("\n".join(summary_lines(data)))
    print(f"wrote {out / 'llamacpp.json'}" + (f" and {png}" if data["png"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
