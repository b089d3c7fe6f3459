"""Warmup-stable-decay (WSD) learning-rate schedule with an early-anneal option.

Nemotron 3 was pre-trained with WSD: linear warmup to the peak, a long constant stage, then a decay to a
floor over the last part of training. One published divergence was fixed by annealing early (starting
the decay before the planned step); `anneal_at` moves the decay start there, keeping its length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


@dataclass(frozen=True)
class WSDSchedule:
    """The learning rate of optimizer step `step` (0 … total_steps−1).

    warmup: lr rises linearly from peak/warmup_steps to peak over `warmup_steps` steps;
    stable: lr = peak until the decay starts at `total_steps − decay_steps` (or `anneal_at` if set);
    decay: lr falls from peak to `min_lr` over `decay_steps` steps with `decay_shape`, then stays at min_lr.
    """

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    decay_steps: int = 0
    min_lr: float = 0.0
    decay_shape: str = "linear"
    anneal_at: int | None = None

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps or not 0 <= self.decay_steps <= self.total_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) and decay_steps ({self.decay_steps}) must lie in [0, total_steps={self.total_steps}]"
            )
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"decay_shape must be one of {DECAY_SHAPES}, got {self.decay_shape!r}")
        if self.anneal_at is not None and not self.warmup_steps <= self.anneal_at <= self.total_steps:
            raise ValueError(f"anneal_at ({self.anneal_at}) must lie in [warmup_steps, total_steps]")
        if self.peak_lr <= 0 or not 0 <= self.min_lr <= self.peak_lr:
            raise ValueError(f"need peak_lr > 0 and 0 <= min_lr <= peak_lr, got {self.peak_lr}, {self.min_lr}")

    @property
    def decay_start(self) -> int:
        return self.anneal_at if self.anneal_at is not None else self.total_steps - self.decay_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        into_decay = step - self.decay_start
        if into_decay < 0:
            return self.peak_lr
        if self.decay_steps == 0:
            return self.min_lr if self.anneal_at is not None else self.peak_lr
        frac = min(1.0, (into_decay + 1) / self.decay_steps)  # fraction of the decay done after this step
        if self.decay_shape == "linear":
            scale = 1.0 - frac
        elif self.decay_shape == "cosine":
            scale = 0.5 * (1.0 + math.cos(math.pi * frac))
        else:  # 1-sqrt (Hägele et al. 2024), a common WSD cooldown
            scale = 1.0 - math.sqrt(frac)
        return self.min_lr + (self.peak_lr - self.min_lr) * scale
