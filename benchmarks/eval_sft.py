"""Per-domain accuracy of a model with thinking on, off and under a thinking budget (base vs SFT).

    python benchmarks/eval_sft.py --model default --label base
    python benchmarks/eval_sft.py --model runs/sft/model --label sft

Greedy decoding on fresh instances (nemotron3.train.evaluate.EVAL_SEED, never a training seed), with the
recipe's task options (arithmetic: its digit range). Thinking on is `task_accuracy`; thinking off renders
the prompt with enable_thinking=False (`<think></think>`); the budget runs thinking on with
`generate_with_budget`, which injects `\\n</think>\\n` after `--budget` reasoning tokens. Each call merges
its label's results into benchmarks/results/sft.json (and redraws sft.png when matplotlib is present).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nemotron3 import LLM, SamplingParams, load_model
from nemotron3.default_model import resolve_model
from nemotron3.engine.reasoning import ReasoningConfig, generate_with_budget
from nemotron3.train.evaluate import EVAL_SEED, task_prompt
from nemotron3.train.sft import SFTConfig, mode_accuracy
from nemotron3.train.tasks import generate, verify

ROOT = Path(__file__).resolve().parents[1]


def budget_accuracy(llm: LLM, domain: str, n: int, budget: int, options: dict, max_tokens: int) -> dict:
    """Accuracy with thinking on and at most `budget` reasoning tokens (then the forced close)."""
    instances = generate(domain, n, EVAL_SEED, **options)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(task_prompt(x)) for x in instances]
    outs = generate_with_budget(llm, prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens),
                                ReasoningConfig(True, budget))  # fmt: skip
    correct = [verify(x, o[0].text) for x, o in zip(instances, outs)]
    return {"domain": domain, "n": n, "budget": budget, "correct": sum(correct), "accuracy": sum(correct) / n,
            "mean_reasoning_tokens": sum(o[0].reasoning_tokens for o in outs) / n,
            "examples": [{"prompt": x.prompt, "gold": x.answer, "output": o[0].text}
                         for x, o in list(zip(instances, outs))[:2]]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--label", required=True)
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "sft.yaml"))
    p.add_argument("--domains", default="arithmetic:100,sorting:50")
    p.add_argument("--budget", type=int, default=16, help="thinking budget for the budgeted arithmetic run (0: skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sft.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    recipe = SFTConfig.from_file(args.recipe)
    model_dir = Path(resolve_model(args.model))
    llm = LLM(load_model(model_dir), tokenizer=model_dir)
    t0 = time.perf_counter()
    rows = []
    for spec in args.domains.split(","):
        domain, n = spec.split(":")
        options = recipe.data.task_options.get(domain, {})
        for thinking in (True, False):
            r = mode_accuracy(llm, domain, int(n), thinking=thinking, options=options,
                              max_tokens=384 if thinking else 64)  # fmt: skip
            rows.append(r)
            print(f"{args.label} {domain} thinking={'on' if thinking else 'off'}: {r['correct']}/{n}", flush=True)
    budget = None
    if args.budget:
        options = recipe.data.task_options.get("arithmetic", {})
        budget = budget_accuracy(llm, "arithmetic", 100, args.budget, options, max_tokens=args.budget + 32)
        print(f"{args.label} arithmetic budget={args.budget}: {budget['correct']}/100", flush=True)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {"eval_seed": EVAL_SEED, "models": {}}
    result["models"][args.label] = {"model": str(model_dir), "tasks": rows, "budget": budget,
                                    "seconds": time.perf_counter() - t0}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = list(result["models"])
    keys = [(t["domain"], t["thinking"]) for t in result["models"][labels[0]]["tasks"]]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        acc = {(t["domain"], t["thinking"]): t["accuracy"] for t in result["models"][label]["tasks"]}
        ax.bar([k + i * width for k in range(len(keys))], [acc.get(k, 0) for k in keys], width, label=label)
    ax.set_xticks([k + width * (len(labels) - 1) / 2 for k in range(len(keys))])
    ax.set_xticklabels([f"{d}\nthinking {'on' if t else 'off'}" for d, t in keys], fontsize=8)
    ax.set_ylabel("greedy exact-match accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
