"""MOPD trainer (nemotron3 train mopd) on the tiny preset: one step end to end changes the student, a teacher
identical to the student gives zero advantages and zero gradient, a teacher favouring a token pulls the
student towards it, prompts are routed to their domain's teacher, recipe / teacher errors name the problem,
and the CLI stage runs and exports."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from nemotron3.cli import main
from nemotron3.config import preset
from nemotron3.io.checkpoint import save_checkpoint
from nemotron3.train.mopd import MOPDConfig, MOPDTrainer
from nemotron3.train.pretrain import build_model
from nemotron3.train.rl import pad_sequences
from tests.train.helpers import ARITH, tiny_chat_checkpoint

ROOT = Path(__file__).resolve().parents[2]
FAVOURED = 300  # the token id the scripted teacher favours


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    return tiny_chat_checkpoint(tmp_path_factory.mktemp("mopd_base"))


def _raw(base: Path, out: Path, **sections) -> dict:
    raw = {
        "model": {"init_from": str(base)},
        "teachers": {"arithmetic": str(base)},
        "rollout": {"domains": ["arithmetic"], "task_options": {"arithmetic": ARITH}, "prompts_per_step": 4,
                    "group_size": 2, "max_tokens": 8},
        "optim": {"lr": 1e-2},
        "run": {"steps": 1, "out_dir": str(out)},
    }  # fmt: skip
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values} if name != "teachers" else values
    return raw


def _config(base: Path, out: Path, **sections) -> MOPDConfig:
    return MOPDConfig.from_dict(_raw(base, out, **sections))


@dataclass
class _Out:
    logits: torch.Tensor


class Favouring(torch.nn.Module):
    """A teacher: another model's logits with `bonus` added to token FAVOURED at every position."""

    def __init__(self, inner: torch.nn.Module, bonus: float = 8.0) -> None:
        super().__init__()
        self.inner, self.bonus, self.config = inner, bonus, inner.config

    def forward(self, ids: torch.Tensor) -> _Out:
        logits = self.inner(ids).logits.clone()
        logits[..., FAVOURED] += self.bonus
        return _Out(logits)


class Spy(torch.nn.Module):
    """A teacher that records the batches it scores."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.config, self.seen = inner, inner.config, []

    def forward(self, ids: torch.Tensor):
        self.seen.append(ids.clone())
        return self.inner(ids)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _load(base: Path) -> torch.nn.Module:
    from nemotron3 import load_model

    return load_model(base)


def test_one_step_end_to_end_changes_the_student(base_checkpoint, tmp_path) -> None:
    trainer = MOPDTrainer(_config(base_checkpoint, tmp_path / "m"), teachers={"arithmetic": Favouring(_load(base_checkpoint))},
                          progress=False)  # fmt: skip
    before = _weights(trainer.model)
    summary = trainer.run()
    record = json.loads((tmp_path / "m" / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("reward_mean", "accuracy", "loss", "kl", "reverse_kl/arithmetic", "grad_norm", "teacher_s"):
        assert key in record, key
    assert record["grad_norm"] > 0 and record["kl"] != 0
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "one MOPD step must change the student"
    assert summary["stage"] == "mopd" and (Path(summary["model_dir"]) / "tokenizer.json").is_file()
    exported = _load(Path(summary["model_dir"]))
    for n, p in exported.named_parameters():
        assert torch.equal(p, trainer.model.get_parameter(n).detach()), n


@pytest.mark.parametrize("same_object", [True, False])
def test_teacher_equal_to_student_gives_zero_advantage(base_checkpoint, tmp_path, same_object) -> None:
    trainer = MOPDTrainer(_config(base_checkpoint, tmp_path / "m"), progress=False)
    if same_object:
        trainer.teachers["arithmetic"] = trainer.model
    before = _weights(trainer.model)
    record = trainer.train_step()
    assert record["kl"] == 0.0 and record["reverse_kl/arithmetic"] == 0.0 and record["advantage_mean"] == 0.0
    assert record["loss"] == 0.0 and record["grad_norm"] == 0.0
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_teacher_preference_pulls_the_student(base_checkpoint, tmp_path) -> None:
    config = _config(base_checkpoint, tmp_path / "m", rollout={"group_size": 16, "max_tokens": 16})
    trainer = MOPDTrainer(config, teachers={"arithmetic": Favouring(_load(base_checkpoint))}, progress=False)
    held = trainer.rollout(1000)
    ids, mask = pad_sequences(held.prompt_ids, held.completion_ids)

    def favoured_prob() -> float:
        trainer.model.eval()
        with torch.no_grad():
            p = torch.softmax(trainer.model(ids).logits[:, :-1].float(), dim=-1)[..., FAVOURED]
        return float((p * mask).sum() / mask.sum())

    p0 = favoured_prob()
    kls = [trainer.train_step()["kl"] for _ in range(10)]
    # Sampled FAVOURED tokens get A ≈ +bonus. Over run seeds 0-4 the probability grew 4.9-39× (seed 0: 4.9× on one
    # thread, 5.9× on two: the rollouts' draws follow the float sums); with bonus 0 it stays at 1.0×. 3× separates
    # the two without riding on one seed's draws.
    assert favoured_prob() > 3 * p0, (p0, favoured_prob(), kls)


def test_prompts_are_routed_to_their_domain_teacher(base_checkpoint, tmp_path) -> None:
    domains = ["arithmetic", "sorting"]
    config = _config(base_checkpoint, tmp_path / "m", rollout={"domains": domains},
                     teachers={d: str(base_checkpoint) for d in domains})  # fmt: skip
    model = _load(base_checkpoint)
    spies = {d: Spy(model) for d in domains}
    trainer = MOPDTrainer(config, teachers=spies, progress=False)
    batch = trainer.rollout(0)
    record = trainer.update(batch)
    group = config.rollout.group_size
    for domain, spy in spies.items():
        assert len(spy.seen) == 1, domain
        rows = [i for i in range(len(batch.prompt_ids)) if batch.instances[i // group].domain == domain]
        assert rows and spy.seen[0].shape[0] == len(rows)
        for seen, i in zip(spy.seen[0], rows):
            expected = [*batch.prompt_ids[i], *batch.completion_ids[i]]
            assert seen[: len(expected)].tolist() == expected
        assert f"reverse_kl/{domain}" in record


def test_recipe_teachers_are_loaded_once_per_checkpoint(base_checkpoint, tmp_path) -> None:
    config = _config(base_checkpoint, tmp_path / "m", rollout={"domains": ["arithmetic", "sorting"]},
                     teachers={"arithmetic": str(base_checkpoint), "sorting": str(base_checkpoint)})  # fmt: skip
    trainer = MOPDTrainer(config, progress=False)
    assert trainer.teachers["arithmetic"] is trainer.teachers["sorting"]
    assert not trainer.teachers["arithmetic"].training
    assert not any(p.requires_grad for p in trainer.teachers["arithmetic"].parameters())


def test_vocab_mismatch_is_refused(base_checkpoint, tmp_path) -> None:
    other = tmp_path / "other"
    config = preset("tiny").replace(vocab_size=256)
    save_checkpoint(build_model(config, seed=1).state_dict(), config, other)
    with pytest.raises(ValueError, match=r"teachers\.arithmetic: vocab size 256"):
        MOPDTrainer(_config(base_checkpoint, tmp_path / "m", teachers={"arithmetic": str(other)}), progress=False)
    with pytest.raises(ValueError, match=r"teachers\.arithmetic: vocab size 256"):
        MOPDTrainer(_config(base_checkpoint, tmp_path / "m2"), teachers={"arithmetic": _load(other)}, progress=False)


def test_different_tokenizer_is_refused(base_checkpoint, tmp_path) -> None:
    other = tmp_path / "other"
    shutil.copytree(base_checkpoint, other)
    (other / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"teachers\.arithmetic: .* different tokenizer"):
        MOPDTrainer(_config(base_checkpoint, tmp_path / "m", teachers={"arithmetic": str(other)}), progress=False)


@pytest.mark.parametrize(
    ("sections", "match"),
    [
        ({"teachers": {}}, r"no teacher for rollout domain\(s\) \['arithmetic'\]"),
        ({"rollout": {"domains": ["arithmetic", "sorting"]}}, r"\['sorting'\]"),
        ({"teachers": {"poetry": "x", "arithmetic": "y"}}, r"teachers\.poetry"),
        ({"teachers": {"arithmetic": 3}}, r"teachers\.arithmetic"),
        ({"teachers": ["arithmetic"]}, r"'teachers' must be a mapping"),
        ({"mopd": {"loss_agg": "sum"}}, r"mopd\.loss_agg"),
        ({"mopd": {"distill_weight": -1}}, r"mopd\.distill_weight"),
        ({"mopd": {"reward_weight": 0.5}, "rollout": {"group_size": 1}}, r"mopd\.reward_weight"),
        ({"mopd": {"kl": 1}}, r"mopd\.kl"),
        ({"grpo": {"kl_coef": 0.1}}, r"grpo\.kl_coef"),
        ({"grpo": {"ppo_epochs": 2}}, r"grpo\.ppo_epochs"),
        ({"rollout": {"temperature": 0}}, r"rollout\.temperature"),
        ({"run": {"steps": 0}}, r"run\.steps"),
    ],
)
def test_config_errors_name_the_problem(base_checkpoint, tmp_path, sections, match) -> None:
    with pytest.raises(ValueError, match=match):
        _config(base_checkpoint, tmp_path / "m", **sections)


def test_group_of_one_and_reward_mixing(base_checkpoint, tmp_path) -> None:
    assert _config(base_checkpoint, tmp_path / "a", rollout={"group_size": 1}).rollout.group_size == 1
    config = _config(base_checkpoint, tmp_path / "m", mopd={"reward_weight": 1.0, "distill_weight": 0.0})

    def reward(instance, text, ids) -> float:  # varies within almost every group of a random model
        return float(ids[0] % 2) if ids else 0.0

    trainer = MOPDTrainer(config, reward_fn=reward, progress=False)
    trainer.teachers["arithmetic"] = trainer.model  # distillation term is 0: only the reward moves the student
    record = trainer.train_step()
    assert record["kl"] == 0.0 and record["grad_norm"] > 0


def test_cli_mopd_and_recipe(base_checkpoint, tmp_path, capsys) -> None:
    import yaml

    recipe = tmp_path / "mopd.yaml"
    recipe.write_text(yaml.safe_dump(_raw(base_checkpoint, tmp_path / "cli")))
    assert main(["train", "mopd", "--config", str(recipe), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["stage"] == "mopd" and summary["step"] == 1
    assert (Path(summary["model_dir"]) / "config.json").is_file()
    assert main(["train", "mopd", "--config", str(recipe), "--set", "rollout.domains=[arithmetic, sorting]"]) == 2
    assert "sorting" in capsys.readouterr().err
    shipped = MOPDConfig.from_file(ROOT / "recipes" / "mopd.yaml")
    assert set(shipped.rollout.domains) <= set(shipped.teachers)


# ------------------------------------------------------------------ async rollouts, resume, MTP


def _first_token_reward(instance, text, ids) -> float:
    return float(ids[0] % 2) if ids else 0.0


def test_async_mopd_scores_stale_rollouts_against_the_sampling_student(base_checkpoint, tmp_path) -> None:
    # teacher = the initial student; the reward moves the student at step 0, yet batch 1 was sampled by
    # version 0, so its distillation advantage log π_T − log π_behaviour is exactly 0 (the MOPD choice),
    # while the ratio π_θ / π_behaviour has moved away from 1
    config = _config(base_checkpoint, tmp_path / "m", rollout={"max_staleness": 1, "group_size": 4},
                     mopd={"reward_weight": 1.0}, run={"steps": 2, "threads": 1})  # fmt: skip
    trainer = MOPDTrainer(config, reward_fn=_first_token_reward, progress=False)
    trainer.producer_timeout_s = 120.0
    trainer.run()
    first, second = trainer.trace
    assert [first["staleness"], second["staleness"]] == [0, 1]
    assert first["kl"] == 0.0 and second["kl"] == 0.0
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert second["ratio_mean"] != pytest.approx(1.0, abs=1e-4) and second["grad_norm"] > 0
    assert trainer.producer is None


def test_mopd_resume_and_mtp(base_checkpoint, tmp_path) -> None:
    teachers = {"arithmetic": Favouring(_load(base_checkpoint))}
    straight = MOPDTrainer(_config(base_checkpoint, tmp_path / "a", run={"steps": 2}, mtp={"loss_weight": 0.3}),
                           teachers=teachers, progress=False)  # fmt: skip
    straight.run()
    assert all(r["mtp_loss"] > 0 for r in straight.trace)
    MOPDTrainer(_config(base_checkpoint, tmp_path / "b", mtp={"loss_weight": 0.3}), teachers=teachers,
                progress=False).run()  # fmt: skip
    resumed = MOPDTrainer(_config(base_checkpoint, tmp_path / "b", run={"steps": 2}, mtp={"loss_weight": 0.3}),
                          teachers=teachers, progress=False, resume=True)  # fmt: skip
    assert resumed.step == 1
    resumed.run()
    for n, p in straight.model.named_parameters():
        assert torch.equal(resumed.model.get_parameter(n), p), n
    assert resumed.trace[1]["loss"] == straight.trace[1]["loss"]


def test_cli_mopd_resume(base_checkpoint, tmp_path, capsys) -> None:
    import yaml

    recipe = tmp_path / "mopd.yaml"
    recipe.write_text(yaml.safe_dump(_raw(base_checkpoint, tmp_path / "cli")))
    assert main(["train", "mopd", "--config", str(recipe), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "mopd", "--config", str(recipe), "--no-progress", "--set", "run.steps=2"]) == 2
    assert "already holds" in capsys.readouterr().err
    assert main(["train", "mopd", "--config", str(recipe), "--no-progress", "--resume", "--set", "run.steps=2"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
