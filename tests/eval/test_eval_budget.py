"""evaluate_budget: budgets bound reasoning tokens, off means none, savings, bad budgets."""

from __future__ import annotations

import pytest

from nemotron3.engine.reasoning import ThinkTokens
from nemotron3.eval import BudgetConfig, common, evaluate_budget
from nemotron3.eval.budget import parse_levels
from nemotron3.io.tokenizer import Tokenizer
from nemotron3.train.evaluate import EVAL_SEED
from nemotron3.train.tasks import generate
from tests.eval.scripted import scripted_generate

ARITH = {"arithmetic": {"digits": [1, 2], "operations": ["add"]}}


def test_budgets_bound_reasoning_tokens(tiny_ckpt) -> None:
    config = BudgetConfig("arithmetic", n=3, seeds=1, budgets=["off", 2, "low", "unbounded"], levels={"low": 5},
                          max_tokens=12, task_options=ARITH)  # fmt: skip
    r = evaluate_budget([f"tiny={tiny_ckpt}"], config)
    close = len(ThinkTokens.from_tokenizer(Tokenizer.from_dir(tiny_ckpt)).close_ids)
    points = {p["budget"]: p for p in r["models"]["tiny"]["points"]}
    assert list(points) == ["off", "2", "low", "unbounded"] and r["budgets"] == list(points)
    assert points["off"]["mean_reasoning_tokens"] == 0 and points["off"]["thinking"] is False
    assert points["low"]["reasoning_budget"] == 5
    for name, budget in (("2", 2), ("low", 5)):
        assert 0 < points[name]["mean_reasoning_tokens"] <= budget + close
    assert points["unbounded"]["mean_reasoning_tokens"] <= 12
    for p in points.values():
        assert 0 <= p["accuracy_mean"] <= 1 and len(p["accuracy_per_seed"]) == 1
        assert p["mean_completion_tokens"] <= 12 + close
    ref = points["unbounded"]["mean_reasoning_tokens"]
    assert points["2"]["token_saving_vs_unbounded"] == pytest.approx(ref / points["2"]["mean_reasoning_tokens"])
    assert points["off"]["token_saving_vs_unbounded"] is None


@pytest.mark.parametrize("correct", [True, False])
def test_accuracy_is_counted(tiny_ckpt, monkeypatch, correct) -> None:
    pool = lambda: [x for s in (EVAL_SEED, EVAL_SEED + 1) for x in generate("arithmetic", 4, s, **ARITH["arithmetic"])]
    monkeypatch.setattr(common, "generate_with_budget", scripted_generate(pool, correct))
    r = evaluate_budget([tiny_ckpt], BudgetConfig(n=4, seeds=2, budgets=["off", 8], task_options=ARITH))
    for p in r["models"]["model"]["points"]:
        assert p["accuracy_per_seed"] == ([1.0, 1.0] if correct else [0.0, 0.0])


def test_bad_budgets() -> None:
    assert parse_levels("low=16,high=96") == {"low": 16, "high": 96}
    for bad in ("low", "low=x", "low=-1"):
        with pytest.raises(ValueError, match="--levels"):
            parse_levels(bad)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        BudgetConfig(budgets=[-1]).resolved()
    with pytest.raises(ValueError, match="unknown budget 'huge'"):
        BudgetConfig(budgets=["huge"]).resolved()
    with pytest.raises(ValueError, match="unknown domain"):
        BudgetConfig(domain="poetry").resolved()
