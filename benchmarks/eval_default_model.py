"""Evaluate a pretrained model (default: the embedded base) as issue 5 asks: held-out loss, task accuracy, samples.

    python benchmarks/eval_default_model.py [--model DIR] [--recipe recipes/default.yaml] [--n 200]

Writes benchmarks/results/default_model.json and default_model.png (accuracy per domain). The held-out
loss is over the same validation sequences the training recipe scores (first `data.valid_sequences`
packed sequences of the corpus's valid.txt), so it is directly comparable with the run's summary.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nemotron3 import LLM, SamplingParams, load_model
from nemotron3.default_model import resolve_model
from nemotron3.train.config import PretrainConfig
from nemotron3.train.corpus import build_corpus
from nemotron3.train.evaluate import held_out_loss, task_accuracy
from nemotron3.train.tasks import generate

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["ROMEO:\n", "First Citizen:\nBefore we proceed any further, hear me speak.\n\n", "KING HENRY.\n"]


def training_prompts(recipe: PretrainConfig, domain: str) -> set[str]:
    """Prompts of the task documents the recipe trained on (to count overlaps with the eval set)."""
    d = recipe.data
    share = sum(1 for i in range(d.task_documents) if d.task_domains[i % len(d.task_domains)] == domain)
    return {x.prompt for x in generate(domain, share, d.seed, **d.task_options.get(domain, {}))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "default.yaml"))
    p.add_argument("--n", type=int, default=200, help="arithmetic problems (other domains: n/4)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "default_model"))
    args = p.parse_args()
    torch.set_num_threads(2)
    recipe = PretrainConfig.from_file(args.recipe)
    model_dir = Path(resolve_model(args.model))
    model = load_model(model_dir)
    llm = LLM(model, tokenizer=model_dir)
    corpus = build_corpus(Path(recipe.data.corpus_dir).expanduser())
    t0 = time.perf_counter()
    result = {"model": str(model_dir), "parameters": sum(p.numel() for p in model.parameters())}
    result["held_out"] = held_out_loss(model, llm.get_tokenizer(), [corpus / "valid.txt"], recipe.data.seq_len,
                                       recipe.data.valid_sequences)  # fmt: skip
    tasks = []
    for domain, n in (
        ("arithmetic", args.n),
        ("sorting", args.n // 4),
        ("tool_use", args.n // 4),
        ("retrieval", args.n // 4),
    ):
        if domain not in recipe.data.task_domains:
            continue
        options = recipe.data.task_options.get(domain, {})
        tasks.append(task_accuracy(llm, domain, n, options=options, train_prompts=training_prompts(recipe, domain)))
        print(f"{domain}: {tasks[-1]['correct']}/{n} = {tasks[-1]['accuracy']:.3f}")
    result["tasks"] = tasks
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=80))
    sampled = llm.generate(PROMPTS, SamplingParams(temperature=0.8, top_p=0.95, max_tokens=80, seed=0))
    result["samples"] = [{"prompt": pr, "greedy": g.outputs[0].text, "sampled_t0.8": s.outputs[0].text}
                         for pr, g, s in zip(PROMPTS, outs, sampled)]  # fmt: skip
    result["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(
        json.dumps({k: v for k, v in result.items() if k != "samples"} | {"held_out": result["held_out"]}, indent=1)[
            :2000
        ]
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([t["domain"] for t in tasks], [t["accuracy"] for t in tasks], color="#76b900")
    for i, t in enumerate(tasks):
        ax.text(i, t["accuracy"] + 0.01, f"{t['correct']}/{t['n']}", ha="center")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("greedy exact-match accuracy")
    ax.set_title(f"default model: held-out loss {result['held_out']['loss']:.3f} nats/token")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
