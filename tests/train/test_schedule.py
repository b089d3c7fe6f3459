"""WSD schedule shape: linear warmup, flat stable stage, decay to min_lr, early anneal."""

from __future__ import annotations

import itertools

import pytest

from nemotron3.train.schedule import WSDSchedule


def test_warmup_stable_decay_shape() -> None:
    s = WSDSchedule(peak_lr=1.0, total_steps=100, warmup_steps=10, decay_steps=20, min_lr=0.1)
    lrs = [s(i) for i in range(100)]
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])  # linear up to the peak
    assert all(lr == 1.0 for lr in lrs[10:80])  # stable
    assert all(a > b for a, b in itertools.pairwise(lrs[79:]))  # strictly decreasing decay
    assert lrs[-1] == pytest.approx(0.1)  # ends at min_lr
    assert lrs[89] == pytest.approx(0.1 + 0.9 * 0.5)  # linear: halfway through the decay


def test_early_anneal_moves_the_decay_start() -> None:
    planned = WSDSchedule(1.0, 100, warmup_steps=5, decay_steps=20, min_lr=0.0)
    early = WSDSchedule(1.0, 100, warmup_steps=5, decay_steps=20, min_lr=0.0, anneal_at=50)
    assert early.decay_start == 50 and planned.decay_start == 80
    assert early(49) == 1.0 and early(50) < 1.0
    assert early(69) == pytest.approx(0.0) and early(99) == pytest.approx(0.0)  # stays at the floor
    assert planned(69) == 1.0


@pytest.mark.parametrize("shape", ["cosine", "1-sqrt"])
def test_other_decay_shapes_end_at_min(shape: str) -> None:
    s = WSDSchedule(2.0, 40, warmup_steps=0, decay_steps=10, min_lr=0.5, decay_shape=shape)
    assert s(29) == 2.0 and s(39) == pytest.approx(0.5) and 0.5 < s(34) < 2.0


@pytest.mark.parametrize(
    "kwargs, match",
    [({"total_steps": 0}, "total_steps"), ({"warmup_steps": 200}, "warmup_steps"),
     ({"decay_shape": "step"}, "decay_shape"), ({"anneal_at": 500}, "anneal_at"), ({"min_lr": 5.0}, "min_lr")],
)  # fmt: skip
def test_bad_schedules_are_refused(kwargs: dict, match: str) -> None:
    base = {"peak_lr": 1.0, "total_steps": 100, "warmup_steps": 10, "decay_steps": 10}
    with pytest.raises(ValueError, match=match):
        WSDSchedule(**{**base, **kwargs})
