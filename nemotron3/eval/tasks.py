"""Per-domain task accuracy of one or more models (e.g. base vs SFT vs RL), mean ± std over instance seeds.

For each model, thinking mode, domain and seed (EVAL_SEED + i), `n` fresh instances are generated with the
given task options (a recipe's, so the evaluation is in-distribution), answered greedily in one batched
generation and verified exactly (nemotron3.train.tasks.verify).
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

THINKING_MODES = {"on": (True,), "off": (False,), "both": (True, False)}


@dataclass
class TasksConfig:
    """domains: {domain: instances per seed}; thinking: on | off | both; max tokens per mode."""

    domains: dict[str, int] = field(default_factory=lambda: {"arithmetic": 100, "sorting": 50,
                                                             "tool_use": 50, "retrieval": 50})  # fmt: skip
    seeds: int = 3
    thinking: str = "on"
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_tokens_thinking: int = 384
    max_tokens_no_thinking: int = 64
    examples: int = 2

    def validate(self) -> None:
        if not self.domains:
            raise ValueError("--domains names no domain")
        for domain, n in self.domains.items():
            check_domain(domain)
            if n < 1:
                raise ValueError(f"--domains: {domain} needs n >= 1, got {n}")
        if self.thinking not in THINKING_MODES:
            raise ValueError(f"--thinking must be one of {list(THINKING_MODES)}, got {self.thinking!r}")
        eval_seeds(self.seeds)
        if min(self.max_tokens_thinking, self.max_tokens_no_thinking) < 1:
            raise ValueError("max tokens must be >= 1")


def parse_domains(spec: str) -> dict[str, int]:
    """`arithmetic:100,sorting:50` -> {"arithmetic": 100, "sorting": 50} (a bare domain means 50)."""
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        domain, sep, n = item.partition(":")
        check_domain(domain.strip())
        try:
            out[domain.strip()] = int(n) if sep else 50
        except ValueError:
            raise ValueError(f"--domains expects DOMAIN:N items, got {item!r}") from None
    if not out:
        raise ValueError(f"--domains names no domain: {spec!r}")
    return out


def evaluate_tasks(
    models: Sequence[str | ModelSpec], config: TasksConfig | None = None, **engine_options: Any
) -> dict[str, Any]:
    """Accuracy per (model, thinking mode, domain): per seed, mean, std, token means, examples; plus the
    average over domains. `models`: `LABEL=PATH` strings or ModelSpecs. Returns the JSON dict."""
    config = config or TasksConfig()
    config.validate()
    specs = parse_models(models)
    seeds = eval_seeds(config.seeds)
    modes = THINKING_MODES[config.thinking]
    result: dict[str, Any] = {
        "eval": "tasks", "eval_seed": EVAL_SEED, "seeds": seeds, "domains": dict(config.domains),
        "thinking": config.thinking, "task_options": config.task_options,
        "max_tokens": {"on": config.max_tokens_thinking, "off": config.max_tokens_no_thinking},
        "threads": torch.get_num_threads(), "models": {},
    }  # fmt: skip
    for spec in specs:
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"model": spec.path, "modes": {}}
        with open_llm(spec, **engine_options) as llm:
            for thinking in modes:
                entry["modes"]["on" if thinking else "off"] = _one_mode(llm, config, seeds, thinking)
        entry["seconds"] = time.perf_counter() - t0
        result["models"][spec.label] = entry
    return result


def _one_mode(llm: Any, config: TasksConfig, seeds: list[int], thinking: bool) -> dict[str, Any]:
    max_tokens = config.max_tokens_thinking if thinking else config.max_tokens_no_thinking
    domains: dict[str, Any] = {}
    for domain, n in config.domains.items():
        acc, comp, reason, ex = [], [], [], []
        for seed in seeds:
            instances = generate(domain, n, seed, **config.task_options.get(domain, {}))
            scored = run_instances(llm, instances, thinking=thinking, max_tokens=max_tokens)
            acc.append(sum(s.correct for s in scored) / n)
            comp += [s.completion_tokens for s in scored]
            reason += [s.reasoning_tokens for s in scored]
            ex = ex or examples(instances, scored, config.examples)
        domains[domain] = {
            "n": n, "accuracy_per_seed": acc, "accuracy_mean": mean(acc), "accuracy_std": std(acc),
            "mean_completion_tokens": mean(comp), "mean_reasoning_tokens": mean(reason), "examples": ex,
        }  # fmt: skip
    per_seed = [mean([d["accuracy_per_seed"][i] for d in domains.values()]) for i in range(len(seeds))]
    average = {
        "accuracy_per_seed": per_seed, "accuracy_mean": mean(per_seed), "accuracy_std": std(per_seed),
        "mean_completion_tokens": mean([d["mean_completion_tokens"] for d in domains.values()]),
        "mean_reasoning_tokens": mean([d["mean_reasoning_tokens"] for d in domains.values()]),
    }  # fmt: skip
    return {"max_tokens": max_tokens, "domains": domains, "average": average}
