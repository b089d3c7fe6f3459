"""Accuracy vs thinking budget: how much reasoning a model needs, and what a budget saves.

Budgets: `off` (thinking disabled in the template, enable_thinking=False), an integer B (thinking on; after
B reasoning tokens `generate_with_budget` injects the closing `\\n</think>\\n` and the model answers),
`unbounded` (thinking on, no budget), or a named level (low/medium/high, mapped to integers by `levels`).
For each budget: accuracy mean/std over seeds, mean reasoning and completion tokens, and the token saving
vs unbounded = unbounded mean reasoning tokens / this budget's mean reasoning tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nemotron3.eval.common import (
    ModelSpec,
    check_domain,
    eval_seeds,
    examples,
    mean,
    open_llm,
    parse_models,
    run_instances,
    std,
)  # fmt: skip
from nemotron3.train.evaluate import EVAL_SEED
from nemotron3.train.tasks import generate

DEFAULT_LEVELS = {"low": 16, "medium": 48, "high": 96}


@dataclass
class BudgetConfig:
    """budgets: "off", "unbounded", level names or integers (>= 0); max_tokens: reasoning + answer."""

    domain: str = "arithmetic"
    n: int = 100
    seeds: int = 3
    budgets: list[str | int] = field(default_factory=lambda: ["off", 16, 48, 96, "unbounded"])
    levels: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_LEVELS))
    max_tokens: int = 384
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    examples: int = 2

    def resolved(self) -> list[tuple[str, bool, int | None]]:
        """(label, thinking, reasoning budget) per budget, validated."""
        check_domain(self.domain)
        if self.n < 1 or self.max_tokens < 1:
            raise ValueError(f"--n and max tokens must be >= 1, got n={self.n}, max_tokens={self.max_tokens}")
        eval_seeds(self.seeds)
        for name, value in self.levels.items():
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"--levels: {name} must map to an integer >= 0, got {value!r}")
        out = []
        for b in self.budgets:
            label = str(b).strip()
            if label == "off":
                out.append((label, False, None))
            elif label == "unbounded":
                out.append((label, True, None))
            elif label in self.levels:
                out.append((label, True, self.levels[label]))
            else:
                try:
                    value = int(label)
                except ValueError:
                    raise ValueError(f"--budgets: unknown budget {label!r}; use off, unbounded, an integer >= 0 "
                                     f"or a level ({', '.join(self.levels)})") from None  # fmt: skip
                if value < 0:
                    raise ValueError(f"--budgets: a budget must be >= 0, got {value}")
                out.append((label, True, value))
        if not out:
            raise ValueError("--budgets names no budget")
        return out


def parse_levels(spec: str) -> dict[str, int]:
    """`low=16,medium=48,high=96` -> {"low": 16, ...}."""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--levels expects NAME=INT items, got {item!r}") from None
        if not sep or not name.strip() or out[name.strip()] < 0:
            raise ValueError(f"--levels expects NAME=INT items with INT >= 0, got {item!r}")
    return out


def evaluate_budget(
    models: Sequence[str | ModelSpec], config: BudgetConfig | None = None, **engine_options: Any
) -> dict[str, Any]:
    """One accuracy-vs-budget curve per model on the same instances; returns the JSON dict."""
    config = config or BudgetConfig()
    budgets = config.resolved()
    specs = parse_models(models)
    seeds = eval_seeds(config.seeds)
    options = config.task_options.get(config.domain, {})
    instance_sets = [generate(config.domain, config.n, s, **options) for s in seeds]
    result: dict[str, Any] = {
        "eval": "budget", "eval_seed": EVAL_SEED, "seeds": seeds, "domain": config.domain, "n": config.n,
        "budgets": [b[0] for b in budgets], "levels": dict(config.levels), "max_tokens": config.max_tokens,
        "task_options": options, "threads": torch.get_num_threads(), "models": {},
    }  # fmt: skip
    for spec in specs:
        t0 = time.perf_counter()
        points = []
        with open_llm(spec, **engine_options) as llm:
            for label, thinking, budget in budgets:
                acc, comp, reason, ex = [], [], [], []
                for instances in instance_sets:
                    scored = run_instances(llm, instances, thinking=thinking, max_tokens=config.max_tokens,
                                           budget=budget)  # fmt: skip
                    acc.append(sum(s.correct for s in scored) / len(scored))
                    comp += [s.completion_tokens for s in scored]
                    reason += [s.reasoning_tokens for s in scored]
                    ex = ex or examples(instances, scored, config.examples)
                points.append({
                    "budget": label, "thinking": thinking, "reasoning_budget": budget,
                    "accuracy_per_seed": acc, "accuracy_mean": mean(acc), "accuracy_std": std(acc),
                    "mean_reasoning_tokens": mean(reason), "mean_completion_tokens": mean(comp), "examples": ex,
                })  # fmt: skip
        _add_savings(points)
        result["models"][spec.label] = {"model": spec.path, "points": points, "seconds": time.perf_counter() - t0}
    return result


def _add_savings(points: list[dict[str, Any]]) -> None:
    """token_saving_vs_unbounded per point (None without an unbounded point or when a point used no tokens)."""
    ref = next((p["mean_reasoning_tokens"] for p in points if p["budget"] == "unbounded"), None)
    for p in points:
        used = p["mean_reasoning_tokens"]
        p["token_saving_vs_unbounded"] = ref / used if ref is not None and used > 0 else None
