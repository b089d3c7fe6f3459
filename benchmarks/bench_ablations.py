"""Pretraining ablations at equal training FLOPs, several seeds each (issue 5 item 5).

    python benchmarks/bench_ablations.py [--steps 120] [--seeds 3] [--out benchmarks/results/ablations]

Four pairs, each a short run of the real `Pretrainer` on the Shakespeare corpus (same data order, same
tokenizer, same number of tokens), repeated over seeds (model init and data order change together):
  (a) hybrid (Mamba-2 + attention + MoE) vs attention-only, same width and depth;
  (b) LatentMoE vs plain MoE with the expert width chosen for equal active parameters per token;
  (c) fp32 vs bf16 gradient reduction (4 micro-batches summed in the reduction dtype);
  (d) no fake quantization (fp32) vs NVFP4 fake-quant training (W/x/dy NVFP4, 16x16 tiles, RHT, SR).
Training FLOPs per token are 6·N_active (matmul weights, excl. embedding lookup) + 6·n_attn·T·d_attn
(causal attention scores and values, forward and backward). Each variant's validation-loss curve is read
at the smaller of the two total budgets (linear interpolation between evaluations), so "equal FLOPs" holds
even when the variants' FLOPs per token differ. Writes JSON (every curve and the summary) and a PNG.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from nemotron3.train.config import DEFAULT_CORPUS_DIR, PretrainConfig
from nemotron3.train.corpus import build_corpus
from nemotron3.train.pretrain import Pretrainer
from nemotron3.train.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]

# Base model: every in/out width a multiple of 16 so NVFP4 fake quant can take every Mamba/MoE linear.
BASE = {
    "hidden_size": 64, "pattern": "M*EM*E", "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "mamba_num_heads": 16, "mamba_head_dim": 8, "n_groups": 2, "ssm_state_size": 16, "chunk_size": 32,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
    "moe_shared_expert_intermediate_size": 128, "moe_latent_size": 32, "num_nextn_predict_layers": 0,
}  # fmt: skip


def plain_moe_width(cfg: dict) -> int:
    """Expert width F_plain of a plain MoE (experts in H) with the LatentMoE's active routed parameters:
    k·2·H·F_plain = 2·H·L + k·2·L·F_latent (the latent projections count as routed-path compute)."""
    H, L, k, F = cfg["hidden_size"], cfg["moe_latent_size"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]
    return round((2 * H * L + k * 2 * L * F) / (2 * k * H))


VARIANTS = {
    "a_hybrid": {}, "a_attention_only": {"model": {"pattern": "**E**E"}},
    "b_latent_moe": {}, "b_plain_moe": {"model": {"moe_latent_size": None, "moe_intermediate_size": plain_moe_width(BASE)}},
    "c_fp32_reduce": {"data": {"micro_batch_size": 2}},
    "c_bf16_reduce": {"data": {"micro_batch_size": 2}, "precision": {"grad_reduce_dtype": "bfloat16"}},
    "d_no_fake_quant": {}, "d_nvfp4_fake_quant": {"precision": {"fake_quant": "nvfp4"}},
}  # fmt: skip
PAIRS = [("a_hybrid", "a_attention_only"), ("b_latent_moe", "b_plain_moe"), ("c_fp32_reduce", "c_bf16_reduce"),
         ("d_no_fake_quant", "d_nvfp4_fake_quant")]  # fmt: skip


def flops_per_token(trainer: Pretrainer, seq_len: int) -> float:
    cfg = trainer.model_config
    active = 0
    for name, p in trainer.model.named_parameters():
        if name.startswith("mtp.") or name.endswith("embeddings.weight") or p.dim() < 2:
            continue
        if ".experts." in name:  # routed experts: k of E run per token
            active += p.numel() * cfg.num_experts_per_tok // cfg.n_routed_experts
        else:
            active += p.numel()
    n_attn = sum(k == "full_attention" or k == "attention" for k in cfg.layers_block_type)
    return 6 * active + 6 * n_attn * seq_len * cfg.num_attention_heads * cfg.head_dim


def run_variant(name: str, seed: int, args, tokenizer: Path, work: Path) -> dict:
    raw = {
        "model": {"preset": "tiny", "init_seed": seed, "overrides": dict(BASE)},
        "data": {"corpus_dir": args.corpus_dir, "tokenizer": str(tokenizer), "seq_len": args.seq_len,
                 "batch_size": 8, "seed": seed, "valid_sequences": 16, "shuffle_buffer": 512},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": max(1, args.steps // 10)},
        "moe": {"seq_aux_loss_coef": 1e-4}, "mtp": {"depths": 0},
        "run": {"steps": args.steps, "out_dir": str(work / f"{name}-s{seed}"), "eval_every": max(1, args.steps // 6),
                "checkpoint_every": args.steps, "seed": seed, "threads": args.threads},
    }  # fmt: skip
    for section, values in VARIANTS[name].items():
        target = raw[section]["overrides"] if section == "model" else raw.setdefault(section, {})
        target.update(values)
    trainer = Pretrainer(PretrainConfig.from_dict(raw), progress=False)
    t0 = time.perf_counter()
    trainer.run()
    fpt = flops_per_token(trainer, args.seq_len)
    curve = [(r["tokens"] * fpt, r["valid_loss"]) for r in trainer.trace if "valid_loss" in r]
    return {"variant": name, "seed": seed, "flops_per_token": fpt, "curve": curve,
            "final_train_loss": trainer.trace[-1]["lm_loss"], "seconds": time.perf_counter() - t0}  # fmt: skip


def loss_at(curve: list[tuple[float, float]], flops: float) -> float:
    """Validation loss at a FLOPs budget, interpolated linearly between evaluations."""
    for (f0, l0), (f1, l1) in itertools.pairwise(curve):
        if f0 <= flops <= f1:
            return l0 + (l1 - l0) * (flops - f0) / (f1 - f0)
    return curve[-1][1] if flops >= curve[-1][0] else curve[0][1]


def summarize(runs: list[dict]) -> list[dict]:
    out = []
    for a, b in PAIRS:
        budget = min(r["curve"][-1][0] for r in runs if r["variant"] in (a, b))
        row = {"pair": [a, b], "flops_budget": budget}
        for v in (a, b):
            losses = [loss_at(r["curve"], budget) for r in runs if r["variant"] == v]
            row[v] = {"mean": statistics.mean(losses), "stdev": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                      "seeds": losses}  # fmt: skip
        row["difference"] = row[b]["mean"] - row[a]["mean"]
        # the same seed means the same data order and initial weights: paired differences cancel that noise
        paired = [y - x for x, y in zip(row[a]["seeds"], row[b]["seeds"])]
        row["paired_difference"] = {"mean": statistics.mean(paired), "seeds": paired,
                                    "stdev": statistics.stdev(paired) if len(paired) > 1 else 0.0}  # fmt: skip
        out.append(row)
    return out


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(3.2 * len(summary), 3.4))
    for ax, row in zip(axes, summary):
        names = row["pair"]
        means = [row[n]["mean"] for n in names]
        errs = [row[n]["stdev"] for n in names]
        ax.bar(range(2), means, yerr=errs, capsize=4, color=["#76b900", "#888888"])
        for i, n in enumerate(names):
            ax.plot([i] * len(row[n]["seeds"]), row[n]["seeds"], "k.", ms=4)
        ax.set_xticks(range(2), [n[2:].replace("_", "\n") for n in names], fontsize=8)
        lo = min(min(row[n]["seeds"]) for n in names)
        hi = max(max(row[n]["seeds"]) for n in names)
        ax.set_ylim(lo - 0.1 * (hi - lo + 0.05), hi + 0.2 * (hi - lo + 0.05))
        d = row["paired_difference"]
        ax.set_title(f"{row['flops_budget']:.2e} FLOPs\npaired Δ {d['mean']:+.3f} ± {d['stdev']:.3f}", fontsize=9)
    axes[0].set_ylabel("validation loss at equal FLOPs")
    fig.suptitle("pretraining ablations (mean ± stdev over seeds; dots: seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--corpus-dir", default=DEFAULT_CORPUS_DIR)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--only", nargs="*", default=None, help="variants to run (default: all)")
    p.add_argument("--work", default=str(ROOT / "runs" / "ablations"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ablations"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    corpus = build_corpus(Path(args.corpus_dir).expanduser())
    tokenizer = train_tokenizer([corpus / "train.txt"], args.vocab_size, work / f"tokenizer-{args.vocab_size}")
    runs = []
    names = args.only or list(VARIANTS)
    for seed in range(args.seeds):
        for name in names:
            runs.append(run_variant(name, seed, args, tokenizer, work))
            r = runs[-1]
            print(f"{name:20s} seed {seed}: valid {r['curve'][-1][1]:.4f} at {r['curve'][-1][0]:.2e} FLOPs "
                  f"({r['seconds']:.1f} s)", flush=True)  # fmt: skip
    summary = summarize(runs) if args.only is None else []
    result = {"config": vars(args), "base_model": BASE, "variants": VARIANTS, "summary": summary, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    if summary:
        plot(summary, out.with_suffix(".png"))
        for row in summary:
            a, b = row["pair"]
            d = row["paired_difference"]
            print(f"{a} {row[a]['mean']:.4f}±{row[a]['stdev']:.4f}  vs  {b} {row[b]['mean']:.4f}±{row[b]['stdev']:.4f}"
                  f"  (paired {b} − {a}: {d['mean']:+.4f} ± {d['stdev']:.4f})")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
