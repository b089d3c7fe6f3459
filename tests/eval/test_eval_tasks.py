"""evaluate_tasks: documented keys, exact accuracy accounting (scripted), seeds, bad arguments."""

from __future__ import annotations

import pytest

from nemotron3.eval import TasksConfig, common, evaluate_tasks
from nemotron3.eval.tasks import parse_domains
from nemotron3.train.evaluate import EVAL_SEED
from nemotron3.train.tasks import generate
from tests.eval.scripted import scripted_generate

ARITH = {"arithmetic": {"digits": [1, 2], "operations": ["add"]}}


def test_real_model_result_has_documented_keys(tiny_ckpt) -> None:
    config = TasksConfig({"arithmetic": 2, "sorting": 2}, seeds=2, thinking="both", task_options=ARITH,
                         max_tokens_thinking=8, max_tokens_no_thinking=4)  # fmt: skip
    r = evaluate_tasks([f"tiny={tiny_ckpt}"], config)
    assert r["seeds"] == [EVAL_SEED, EVAL_SEED + 1] and r["eval"] == "tasks"
    modes = r["models"]["tiny"]["modes"]
    assert set(modes) == {"on", "off"}
    for mode, limit in (("on", 8), ("off", 4)):
        for d in ("arithmetic", "sorting"):
            row = modes[mode]["domains"][d]
            assert len(row["accuracy_per_seed"]) == 2 and all(0 <= a <= 1 for a in row["accuracy_per_seed"])
            assert 0 <= row["accuracy_mean"] <= 1 and row["accuracy_std"] >= 0
            assert 0 < row["mean_completion_tokens"] <= limit + 4  # + a forced close at most
            assert len(row["examples"]) == 2
        assert set(modes[mode]["average"]) >= {"accuracy_mean", "accuracy_std", "mean_reasoning_tokens"}
    assert modes["off"]["domains"]["arithmetic"]["mean_reasoning_tokens"] == 0


@pytest.mark.parametrize("correct", [True, False])
def test_accuracy_counts_gold_and_wrong_answers(tiny_ckpt, monkeypatch, correct) -> None:
    domains = {"arithmetic": 3, "sorting": 2, "tool_use": 2, "retrieval": 2}
    seeds = [EVAL_SEED, EVAL_SEED + 1]
    pool = lambda: [x for d, n in domains.items() for s in seeds for x in generate(d, n, s, **ARITH.get(d, {}))]
    monkeypatch.setattr(common, "generate_with_budget", scripted_generate(pool, correct))
    r = evaluate_tasks([f"m={tiny_ckpt}"], TasksConfig(domains, seeds=2, task_options=ARITH))
    mode = r["models"]["m"]["modes"]["on"]
    expected = 1.0 if correct else 0.0
    assert all(mode["domains"][d]["accuracy_per_seed"] == [expected, expected] for d in domains)
    assert mode["average"]["accuracy_mean"] == expected and mode["average"]["accuracy_std"] == 0.0


def test_seeds_give_different_instances_and_repeat(tiny_ckpt, monkeypatch) -> None:
    calls: list = []
    pool = lambda: [x for s in (EVAL_SEED, EVAL_SEED + 1) for x in generate("sorting", 4, s)]
    monkeypatch.setattr(common, "generate_with_budget", scripted_generate(pool, True, calls))
    evaluate_tasks([tiny_ckpt], TasksConfig({"sorting": 4}, seeds=2))
    evaluate_tasks([tiny_ckpt], TasksConfig({"sorting": 4}, seeds=1))
    assert len(calls) == 3 and len(calls[0]) == 4  # one batched call per (model, domain, seed)
    assert calls[0] != calls[1] and calls[2] == calls[0]


def test_bad_arguments() -> None:
    assert parse_domains("arithmetic:100,sorting") == {"arithmetic": 100, "sorting": 50}
    with pytest.raises(ValueError, match="unknown domain 'poetry'"):
        parse_domains("poetry:3")
    with pytest.raises(ValueError, match="--domains"):
        parse_domains("arithmetic:many")
    with pytest.raises(ValueError, match="--thinking"):
        evaluate_tasks(["default"], TasksConfig({"arithmetic": 1}, thinking="maybe"))
    with pytest.raises(ValueError, match="--model"):
        evaluate_tasks(["=x"], TasksConfig({"arithmetic": 1}))
