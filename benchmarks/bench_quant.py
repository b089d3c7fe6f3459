"""W4A16 on CPU: weight memory, decode speed and quality of a PTQ-quantized model against fp32 and bf16.

    python benchmarks/bench_quant.py                      # nemo50 (research/perf.md §2), random weights
    python benchmarks/bench_quant.py --model DIR          # a trained checkpoint directory (or a preset)
    python benchmarks/bench_quant.py --smoke --no-plot    # tiny sizes, seconds (the test suite runs this)

In one process: the float model is saved, quantized with `nemotron3.quant.ptq` (recipe `ultra` by
default: NVFP4 routed experts, FP8 shared experts and Mamba in/out_proj; calibrated on the first half of
the evaluation text) and loaded back through `nemotron3.load_model`. Variants:

    fp32          the float model                       bf16   the float model cast to bf16
    w4a16-fp32    quantized, activations fp32           w4a16-bf16  quantized, activations bf16

Decode: batch 1, greedy, `--tokens` steps after a `--prompt-len` prompt through the model's own cache;
repeats interleaved across variants (each repeat times every variant once), medians reported. Quality
on the second half of the text (windows of `--eval-len` tokens): perplexity of each variant, next-token
(argmax) agreement and mean KL(fp32 ‖ variant). Without a tokenizer the text's UTF-8 bytes are the tokens
(a random-weight model has no tokenizer; perplexities of random weights only compare variants).
Writes benchmarks/results/quant.json and quant.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import common

import nemotron3
from nemotron3.model.nemotron import NemotronHForCausalLM
from nemotron3.quant.load import quantized_weight_bytes
from nemotron3.quant.ptq import quantize_checkpoint

ROOT = HERE.parent
TEXT_FILES = ("README.md", "docs/data.md", "docs/quant-recipes.md", "benchmarks/README.md")


def build_float(spec: str, seed: int) -> tuple[NemotronHForCausalLM, Path | None]:
    """A benchmark config name (common.CONFIGS), a preset, or a checkpoint directory → fp32 model."""
    if spec in common.CONFIGS:
        cfg = common.config(spec).replace(dt_clamp="checkpoint")
        model = NemotronHForCausalLM(cfg)
        model.init_weights(torch.Generator().manual_seed(seed))
        return model.eval(), None
    model = nemotron3.load_model(spec, seed=seed)
    return model, Path(spec) if Path(spec).is_dir() else None


def token_text(directory: Path | None, vocab: int, text_file: str | None) -> tuple[torch.Tensor, str]:
    paths = [Path(text_file)] if text_file else [ROOT / p for p in TEXT_FILES if (ROOT / p).is_file()]
    text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in paths)
    if directory is not None and (directory / "tokenizer.json").is_file():
        from nemotron3.io.tokenizer import Tokenizer

        return torch.tensor(Tokenizer.from_dir(directory).encode(text)), "tokenizer.json"
    return torch.tensor(list(text.encode("utf-8"))) % vocab, "utf-8 bytes"


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@torch.inference_mode()
def decode_once(model, prompt: torch.Tensor, tokens: int) -> float:
    """Seconds for `tokens` greedy decode steps after prefilling `prompt` [1, P] (prefill not timed)."""
    cache = model.new_cache(1)
    nxt = model(prompt, cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(tokens):
        nxt = model(nxt, cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - t0


@torch.inference_mode()
def quality(models: dict, ids: torch.Tensor, eval_len: int, windows: int) -> dict:
    starts = torch.linspace(0, max(ids.numel() - eval_len - 1, 0), windows).long().tolist()
    logps = {name: [] for name in models}
    for s in starts:
        x = ids[s : s + eval_len][None]
        for name, m in models.items():
            logps[name].append(F.log_softmax(m(x).logits.float()[0, :-1], -1))
    targets = torch.cat([ids[s + 1 : s + eval_len] for s in starts])
    ref = torch.cat(logps["fp32"])
    out = {}
    for name, lp in logps.items():
        lp = torch.cat(lp)
        nll = -lp.gather(1, targets[:, None]).mean()
        out[name] = {
            "perplexity": float(nll.exp()),
            "next_token_agreement_vs_fp32": float((lp.argmax(-1) == ref.argmax(-1)).float().mean()),
            "kl_from_fp32": float((ref.exp() * (ref - lp)).sum(-1).mean()),
        }
    out["eval_tokens"] = int(targets.numel())
    return out


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("no matplotlib (pip install -e .[bench]): skipping the PNG", file=sys.stderr)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["variants"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    mib = [result["variants"][n]["weight_mib"] for n in names]
    tps = [result["variants"][n]["decode_tok_s"]["median"] for n in names]
    ppl = [result["quality"][n]["perplexity"] for n in names]
    for ax, values, title in ((axes[0], mib, "weight memory (MiB)"), (axes[1], tps, "decode tok/s (batch 1, median)"),
                              (axes[2], ppl, "perplexity (lower is better)")):  # fmt: skip
        bars = ax.bar(names, values, color=["#4c72b0", "#55a868", "#c44e52", "#dd8452"][: len(names)])
        ax.set_title(title)
        ax.bar_label(bars, fmt="%.3g")
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"{result['model']} · recipe {result['recipe']} · {result['machine'].get('threads')} threads · "
                 f"agreement w4a16-fp32 vs fp32 {result['quality']['w4a16-fp32']['next_token_agreement_vs_fp32']:.3f}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="nemo50", help=f"{', '.join(common.CONFIGS)}, a preset, or a checkpoint dir")
    p.add_argument("--recipe", default="ultra")
    p.add_argument("--tokens", type=int, default=32, help="decode steps per repeat")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--calib", type=int, default=8)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--eval-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--text", default=None, help="text file for calibration and evaluation (default: the repo's docs)")
    p.add_argument("--threads", type=int, default=common.THREADS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(common.RESULTS))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: a functional check in seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.model = "tiny50" if args.model == "nemo50" else args.model
        args.tokens, args.prompt_len, args.reps, args.calib, args.calib_len = 2, 8, 1, 1, 16
        args.eval_len, args.windows = 16, 1
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    float_model, directory = build_float(args.model, args.seed)
    ids, tokens_from = token_text(directory, float_model.config.vocab_size, args.text)
    half = ids.numel() // 2
    calib_ids, eval_ids = ids[:half], ids[half:]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "float", Path(tmp) / "quant"
        nemotron3.save_checkpoint(float_model, float_model.config, src)
        calib_file = Path(tmp) / "calib.txt"
        # calibration text: the first half, as the tokens the model will see (bytes → latin-1 keeps ids < 256)
        if tokens_from == "utf-8 bytes":
            calib_file.write_bytes(bytes(int(t) for t in calib_ids))
        else:
            calib_file.write_text(ROOT.joinpath(TEXT_FILES[0]).read_text())
            if directory is not None:
                for f in ("tokenizer.json", "tokenizer_config.json"):
                    if (directory / f).is_file():
                        (src / f).write_bytes((directory / f).read_bytes())
        t0 = time.perf_counter()
        r = quantize_checkpoint(src, dst, args.recipe, calib=args.calib, seq_len=args.calib_len,
                                calib_text=str(calib_file), progress=False)  # fmt: skip
        quantize_s = time.perf_counter() - t0
        disk = {"float_bf16_mib": None, "quantized_mib": r.bytes_on_disk / 2**20}
        variants = {
            "fp32": float_model,
            "bf16": nemotron3.load_model(src, dtype=torch.bfloat16),
            "w4a16-fp32": nemotron3.load_model(dst, dtype=torch.float32),
            "w4a16-bf16": nemotron3.load_model(dst, dtype=torch.bfloat16),
        }
        disk["float_bf16_mib"] = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**20
    prompt = eval_ids[: args.prompt_len][None]
    for m in variants.values():  # warm-up
        decode_once(m, prompt, 2)
    times: dict[str, list[float]] = {n: [] for n in variants}
    for _ in range(args.reps):
        for name, m in variants.items():
            times[name].append(args.tokens / decode_once(m, prompt, args.tokens))
    q = quality(variants, eval_ids, args.eval_len, args.windows)
    result = {
        "model": args.model,
        "recipe": args.recipe,
        "config": common.describe(float_model.config),
        "machine": {**common.machine_info(), "threads": torch.get_num_threads()},
        "tokens_from": tokens_from,
        "quantize": {
            "seconds": quantize_s,
            "quant_algo": r.quant_algo,
            "quantized_matrices": r.quantized_modules,
            "calib_samples": r.calib_samples,
            "calib_tokens": r.calib_tokens,
        },
        "disk": disk,
        "variants": {},
        "quality": q,
        "settings": {k: getattr(args, k) for k in ("tokens", "prompt_len", "reps", "eval_len", "windows", "seed")},
    }
    for name, m in variants.items():
        by_kind = quantized_weight_bytes(m)
        result["variants"][name] = {
            "weight_mib": weight_bytes(m) / 2**20,
            "weight_mib_by_storage": {k: v / 2**20 for k, v in by_kind.items()},
            "decode_tok_s": {"median": statistics.median(times[name]), "max": max(times[name]), "all": times[name]},
        }
    base = result["variants"]["fp32"]
    for v in result["variants"].values():
        v["weight_fraction_of_fp32"] = v["weight_mib"] / base["weight_mib"]
        v["decode_speed_vs_fp32"] = v["decode_tok_s"]["median"] / base["decode_tok_s"]["median"]
    result["total_s"] = time.perf_counter() - t_start
    name = "quant_smoke" if args.smoke else "quant"
    common.write_json(out_dir / f"{name}.json", result)
    if not args.no_plot:
        plot(result, out_dir / f"{name}.png")
    print(f"{args.model}: recipe {args.recipe}, quantized in {quantize_s:.1f} s; total {result['total_s']:.0f} s")
    print(
        "| variant | weight MiB | decode tok/s (median) | (best) | perplexity | next-token agreement | KL from fp32 |"
    )
    print("|---|---|---|---|---|---|---|")
    for n, v in result["variants"].items():
        qq = q[n]
        print(f"| {n} | {v['weight_mib']:.1f} | {v['decode_tok_s']['median']:.1f} | {v['decode_tok_s']['max']:.1f} | "
            f"{qq['perplexity']:.3f} | "
              f"{qq['next_token_agreement_vs_fp32']:.3f} | {qq['kl_from_fp32']:.5f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
