"""Model specs, task options from recipes, prompt rendering, seed statistics."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemotron3.eval.common import (
    ModelSpec,
    eval_seeds,
    load_task_options,
    parse_int_list,
    parse_models,
    render_prompt,
    set_task_option,
    std,
)  # fmt: skip
from nemotron3.train.evaluate import EVAL_SEED
from nemotron3.train.tasks import generate

ROOT = Path(__file__).resolve().parents[2]


def test_model_specs() -> None:
    assert ModelSpec.parse("base=default") == ModelSpec("base", "default")
    assert ModelSpec.parse("runs/sft/model") == ModelSpec("model", "runs/sft/model")
    for bad in ("=runs/x", "sft=", ""):
        with pytest.raises(ValueError, match="--model"):
            ModelSpec.parse(bad)
    with pytest.raises(ValueError, match="unique"):
        parse_models(["a=x", "a=y"])
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        ModelSpec.parse("x=/nonexistent/dir").directory()


def test_task_options_from_recipes(tmp_path) -> None:
    (tmp_path / "sft.yaml").write_text("data:\n  task_options:\n    arithmetic: {digits: [1, 3]}\n")
    sft = load_task_options(tmp_path / "sft.yaml")  # data.task_options
    assert sft["arithmetic"]["digits"] == [1, 3]
    assert load_task_options(ROOT / "recipes" / "sft.yaml")["arithmetic"]["operations"] == ["add", "sub"]
    (tmp_path / "rl.yaml").write_text("rollout:\n  task_options:\n    sorting: {length: 4}\n")
    assert load_task_options(tmp_path / "rl.yaml") == {"sorting": {"length": 4}}
    assert set_task_option(sft, "arithmetic.digits=[1,2]")["arithmetic"]["digits"] == [1, 2]
    assert sft["arithmetic"]["digits"] == [1, 3]  # a copy was changed
    with pytest.raises(ValueError, match="unknown domain"):
        set_task_option({}, "poetry.lines=3")
    with pytest.raises(ValueError, match="DOMAIN.KEY=VALUE"):
        set_task_option({}, "digits=3")
    with pytest.raises(ValueError, match="--task-options"):
        load_task_options(tmp_path / "missing.yaml")


def test_prompts_seeds_and_stats() -> None:
    x = generate("arithmetic", 1, EVAL_SEED)[0]
    assert render_prompt(x, True).endswith("<think>\n")
    assert render_prompt(x, False).rstrip().endswith("<think></think>")
    assert eval_seeds(3) == [EVAL_SEED, EVAL_SEED + 1, EVAL_SEED + 2]
    with pytest.raises(ValueError, match="seeds"):
        eval_seeds(0)
    assert std([1.0]) == 0.0 and std([0.0, 1.0]) == pytest.approx(0.7071, abs=1e-4)
    assert parse_int_list("256,512", "--lengths") == [256, 512]
    with pytest.raises(ValueError, match="--lengths"):
        parse_int_list("256,abc", "--lengths")
