"""RULER-style long-context retrieval: accuracy per (context length in tokens, needle depth).

Each cell asks `n` key-value retrieval questions (`retrieval_task` with `context_tokens=L` counted by the
model's own tokenizer and the needle at `depth`), instances from seed EVAL_SEED. With thinking on the model
writes a one-line trace ("I need the value of K. Scanning the list, line i of N reads ...") before the
answer, so max_tokens leaves room for it. Lengths whose prompt + max_tokens do not fit the engine's
max_model_len (the model's max_position_embeddings unless lowered) are skipped and listed with a note.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from nemotron3.eval.common import ModelSpec, open_llm, parse_models, render_prompt, run_instances
from nemotron3.train.evaluate import EVAL_SEED
from nemotron3.train.tasks import retrieval_task


@dataclass
class RulerConfig:
    """lengths: context sizes in tokens; depths: needle positions in [0, 1]; n: questions per cell."""

    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    n: int = 8
    thinking: bool = True
    max_tokens: int | None = None  # default: 128 with thinking (trace + answer), 32 without

    def validate(self) -> None:
        if not self.lengths or any(x < 1 for x in self.lengths):
            raise ValueError(f"--lengths must be integers >= 1, got {self.lengths}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"--depths must lie in [0, 1], got {self.depths}")
        if self.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {self.max_tokens}")

    @property
    def tokens(self) -> int:
        return self.max_tokens or (128 if self.thinking else 32)


def evaluate_ruler(model: str | ModelSpec, config: RulerConfig | None = None, **engine_options: Any) -> dict[str, Any]:
    """Accuracy grid (depth rows x length columns), seconds per cell and skipped lengths; the JSON dict."""
    config = config or RulerConfig()
    config.validate()
    spec = parse_models([model])[0]
    t0 = time.perf_counter()
    with open_llm(spec, **engine_options) as llm:
        tok = llm.get_tokenizer()
        limit = int(getattr(llm.engine, "max_model_len", llm.model.config.max_position_embeddings))

        def count(text: str) -> int:
            return len(tok.encode(text))

        cells, skipped = [], []
        for length in config.lengths:
            row = []
            for depth in config.depths:
                rng = random.Random(f"ruler/{EVAL_SEED}/{length}/{depth}")
                instances = [retrieval_task(rng, context_tokens=length, count_tokens=count, depth=depth)
                             for _ in range(config.n)]  # fmt: skip
                longest = max(count(render_prompt(x, config.thinking)) for x in instances)
                if longest + config.tokens > limit:
                    skipped.append({"length": length, "depth": depth, "prompt_tokens": longest,
                                    "note": f"prompt {longest} + max_tokens {config.tokens} > max_model_len {limit}"})  # fmt: skip
                    row = None
                    break
                c0 = time.perf_counter()
                scored = run_instances(llm, instances, thinking=config.thinking, max_tokens=config.tokens)
                row.append({
                    "length": length, "depth": depth, "n": config.n,
                    "accuracy": sum(s.correct for s in scored) / config.n, "seconds": time.perf_counter() - c0,
                    "mean_prompt_tokens": sum(count(render_prompt(x, config.thinking)) for x in instances) / config.n,
                    "mean_context_tokens": sum(x.metadata["context_tokens"] for x in instances) / config.n,
                    "mean_completion_tokens": sum(s.completion_tokens for s in scored) / config.n,
                    "example": {"gold": instances[0].answer, "output": scored[0].text},
                })  # fmt: skip
            if row is not None:
                cells += row
        max_pos = int(llm.model.config.max_position_embeddings)
    evaluated = [x for x in config.lengths if any(c["length"] == x for c in cells)]
    grid = [[next((c["accuracy"] for c in cells if c["length"] == x and c["depth"] == d), None) for x in evaluated]
            for d in config.depths]  # fmt: skip
    return {
        "eval": "ruler", "eval_seed": EVAL_SEED, "model": spec.path, "label": spec.label,
        "thinking": config.thinking, "n": config.n, "max_tokens": config.tokens, "lengths": evaluated,
        "requested_lengths": list(config.lengths), "depths": list(config.depths), "max_model_len": limit,
        "max_position_embeddings": max_pos, "skipped": skipped, "cells": cells, "accuracy_grid": grid,
        "mean_accuracy": sum(c["accuracy"] for c in cells) / len(cells) if cells else None,
        "threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0,
    }  # fmt: skip
