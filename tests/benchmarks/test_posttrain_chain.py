"""benchmarks/posttrain_chain.py: the stage commands it runs and the acceptance claims it checks.

The stages themselves are the trainers' CLI commands, each smoke-tested in tests/train; here: every
command is well formed (recipes exist and parse, seeds shift, teachers are wired to MOPD) and the claim
checks give the right verdicts on hand-made evaluation results, both ways.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_chain():
    spec = importlib.util.spec_from_file_location("posttrain_chain", ROOT / "benchmarks" / "posttrain_chain.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


chain = _load_chain()


def _sets(cmd: list[str]) -> dict[str, str]:
    return dict(cmd[i + 1].split("=", 1) for i, a in enumerate(cmd) if a == "--set")


def test_stage_commands_use_existing_recipes_and_shift_seeds(tmp_path: Path) -> None:
    from nemotron3.train.mopd import MOPDConfig
    from nemotron3.train.rl import RLConfig
    from nemotron3.train.sft import SFTConfig

    loaders = {"sft": SFTConfig, "rl": RLConfig, "mopd": MOPDConfig}
    stages = chain.stages(tmp_path)
    assert [s.name for s in stages] == ["sft", *(f"teacher_{d}" for d in chain.TEACHER_DOMAINS), "rl", "mopd"]
    for stage in stages:
        loaders[stage.trainer].from_file(ROOT / stage.recipe)  # parses and validates
        s0, s1 = _sets(chain.train_command(stage, tmp_path, 0)), _sets(chain.train_command(stage, tmp_path, 1))
        assert s0["run.out_dir"] == str(tmp_path / stage.name)
        for key in stage.seed_keys:
            assert int(s1[key]) == int(s0[key]) + 100
    mopd = _sets(chain.train_command(stages[-1], tmp_path, 0))
    assert mopd["model.init_from"] == str(tmp_path / "sft" / "model")
    assert {k for k in mopd if k.startswith("teachers.")} == {f"teachers.{d}" for d in chain.TEACHER_DOMAINS}
    reused = chain.stages(tmp_path, teachers_root=Path("/elsewhere"))
    assert not any(s.name.startswith("teacher_") for s in reused)
    assert _sets(chain.train_command(reused[-1], tmp_path, 0))["teachers.sorting"].startswith("/elsewhere")


def _tasks(acc: dict[str, dict[str, float]]) -> dict:
    """A posttrain_tasks.json-shaped dict with the given per-model, per-domain accuracies (std 0)."""
    models = {}
    for label, per_domain in acc.items():
        rows = {d: {"accuracy_mean": a, "accuracy_std": 0.0} for d, a in per_domain.items()}
        avg = sum(per_domain.values()) / len(per_domain)
        models[label] = {"modes": {"on": {"domains": rows, "average": {"accuracy_mean": avg, "accuracy_std": 0.0}}}}
    return {"domains": list(next(iter(acc.values()))), "models": models}


def _results(mopd: float, rl_bonus: float) -> dict:
    domains = ["arithmetic", "sorting", "tool_use"]
    acc = {"base": dict.fromkeys(domains, 0.0), "sft": dict.fromkeys(domains, 0.3),
           "rl": dict.fromkeys(domains, 0.3 + rl_bonus), "mopd": dict.fromkeys(domains, mopd)}  # fmt: skip
    acc.update({f"teacher_{d}": {x: (0.6 if x == d else 0.0) for x in domains} for d in domains})
    return _tasks(acc)


@pytest.mark.parametrize(("mopd", "rl_bonus", "expect"), [(0.55, 0.05, True), (0.28, -0.05, False)])
def test_claims_verdicts(mopd: float, rl_bonus: float, expect: bool) -> None:
    c = chain.claims(_results(mopd, rl_bonus), None, margin=0.10)
    assert c["sft_gt_base"]["holds"]
    assert c["rl_gt_sft"]["holds"] is (rl_bonus > 0)
    assert c["mopd_ge_best_single_stage"]["holds"] is expect
    assert c["mopd_within_margin_of_teachers"]["holds"] is expect  # 0.6 − 0.55 ≤ 0.10; 0.6 − 0.28 > 0.10


def test_budget_claim_and_tables() -> None:
    points = [{"budget": b, "accuracy_mean": a, "mean_reasoning_tokens": t, "token_saving_vs_unbounded": s}
              for b, a, t, s in [("off", 0.1, 0, None), ("low", 0.05, 16, 6.0), ("medium", 0.2, 40, 2.5),
                                 ("high", 0.3, 80, 1.25), ("unbounded", 0.35, 100, 1.0)]]  # fmt: skip
    budget = {"budgets": [p["budget"] for p in points], "models": {"sft": {"points": points}}}
    c = chain.claims(_results(0.5, 0.05), budget, margin=0.10)
    assert c["budget_sft"]["monotone"] is False  # off (0.1) > low (0.05)
    assert c["budget_sft"]["medium_token_saving"] == 2.5
    table = chain.markdown(_results(0.5, 0.05), budget)
    assert "| mopd | 0.500 ± 0.000" in table and "0.200 (40 tok)" in table
