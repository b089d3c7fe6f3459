"""GRPO trainer (nemotron3 train rl) on the tiny preset with scripted rewards: one step end to end changes
the weights, the policy gradient has the right sign, zero-variance groups give no update, recipe errors
name the key, ppo_epochs > 1 and the KL reference work, the CLI runs and exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nemotron3.cli import main
from nemotron3.train.rl import RLConfig, RLTrainer, pad_sequences, sequence_logprobs, step_instances
from tests.train.helpers import ARITH, tiny_chat_checkpoint

ROOT = Path(__file__).resolve().parents[2]
FAVOURED = 300  # the token id the scripted reward favours


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    return tiny_chat_checkpoint(tmp_path_factory.mktemp("rl_base"))


def _config(base: Path, out: Path, **sections) -> RLConfig:
    raw = {
        "model": {"init_from": str(base)},
        "rollout": {"domains": ["arithmetic"], "task_options": {"arithmetic": ARITH}, "prompts_per_step": 4,
                    "group_size": 4, "max_tokens": 8},
        "optim": {"lr": 1e-2},
        "run": {"steps": 1, "out_dir": str(out)},
    }  # fmt: skip
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return RLConfig.from_dict(raw)


def favour(sign: float = 1.0):
    """A scripted reward: ± the fraction of completion tokens that are FAVOURED."""
    return lambda instance, text, ids: sign * sum(t == FAVOURED for t in ids) / max(len(ids), 1)


def first_token_reward(instance, text, ids) -> float:
    """Varies within almost every group of a random model (parity of the first sampled token)."""
    return float(ids[0] % 2) if ids else 0.0


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _favoured_prob(trainer: RLTrainer, batch) -> float:
    """Mean probability of FAVOURED over the completion positions of a fixed batch (teacher-forced)."""
    ids, mask = pad_sequences(batch.prompt_ids, batch.completion_ids)
    with torch.no_grad():
        p = torch.softmax(trainer.model(ids).logits[:, :-1].float(), dim=-1)[..., FAVOURED]
    return float((p * mask).sum() / mask.sum())


def test_one_step_end_to_end_changes_the_weights(base_checkpoint, tmp_path) -> None:
    trainer = RLTrainer(_config(base_checkpoint, tmp_path / "rl"), reward_fn=first_token_reward, progress=False)
    before = _weights(trainer.model)
    summary = trainer.run()
    record = json.loads((tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("reward_mean", "accuracy", "completion_len_mean", "loss", "kl", "clip_frac", "grad_norm"):
        assert key in record, key
    assert record["grad_norm"] > 0 and record["clip_frac"] == 0.0 and record["ratio_mean"] == pytest.approx(1.0)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "one RL step must change the weights"
    from nemotron3 import load_model

    exported = load_model(summary["model_dir"])
    for n, p in exported.named_parameters():
        assert torch.equal(p, trainer.model.get_parameter(n).detach()), n
    assert (Path(summary["model_dir"]) / "tokenizer.json").is_file()


def test_rollouts_are_scored_and_masked_correctly(base_checkpoint, tmp_path) -> None:
    trainer = RLTrainer(_config(base_checkpoint, tmp_path / "rl"), progress=False)
    batch = trainer.rollout(0)
    assert batch.rewards.shape == (4, 4) and len(batch.completion_ids) == 16
    assert [x.prompt for x in batch.instances] == [x.prompt for x in step_instances(trainer.cfg, 0)]
    assert step_instances(trainer.cfg, 0)[0].prompt != step_instances(trainer.cfg, 1)[0].prompt
    assert len({tuple(c) for c in batch.completion_ids[:4]}) > 1  # the G samples of a prompt differ
    ids, mask = pad_sequences(batch.prompt_ids, batch.completion_ids)
    assert mask.sum() == sum(len(c) for c in batch.completion_ids)
    # the teacher-forced log-probs of the sampled tokens match the engine's
    trainer.model.eval()
    lp = sequence_logprobs(trainer.model, ids[:1])[0][mask[0] > 0]
    from nemotron3.engine.sampling_params import SamplingParams

    out = trainer.llm.generate({"prompt_token_ids": batch.prompt_ids[0]},
                               SamplingParams(temperature=1.0, max_tokens=8, seed=7, logprobs=0))[0].outputs[0]  # fmt: skip
    ids1, mask1 = pad_sequences([batch.prompt_ids[0]], [out.token_ids])
    lp1 = sequence_logprobs(trainer.model, ids1)[0][mask1[0] > 0]
    expected = torch.tensor([d[t].logprob for d, t in zip(out.logprobs, out.token_ids)])
    assert torch.allclose(lp1, expected, atol=1e-4)
    assert lp.shape == (len(batch.completion_ids[0]),)


def test_policy_gradient_has_the_right_sign(base_checkpoint, tmp_path) -> None:
    cfg = {"rollout": {"group_size": 16, "max_tokens": 16}}
    probs = {}
    for sign in (1.0, -1.0):
        trainer = RLTrainer(_config(base_checkpoint, tmp_path / f"rl{sign}", **cfg), reward_fn=favour(sign),
                            progress=False)  # fmt: skip
        held = trainer.rollout(1000)
        p0 = _favoured_prob(trainer, held)
        for _ in range(6):
            trainer.train_step()
        probs[sign] = (p0, _favoured_prob(trainer, held))
    (p0, up), (q0, down) = probs[1.0], probs[-1.0]
    assert p0 == pytest.approx(q0)
    assert up > 3 * p0, probs  # rewarding the token makes it likelier …
    assert down < p0, probs  # … penalising it makes it rarer


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_zero_variance_groups_give_no_update(base_checkpoint, tmp_path, kl_coef) -> None:
    trainer = RLTrainer(_config(base_checkpoint, tmp_path / "rl", grpo={"kl_coef": kl_coef}),
                        reward_fn=lambda x, text, ids: 1.0, progress=False)  # fmt: skip
    before = _weights(trainer.model)
    record = trainer.train_step()
    assert record["zero_variance_groups"] == 1.0 and record["reward_mean"] == 1.0 and record["accuracy"] == 1.0
    # zero advantages → zero policy gradient; the KL gradient vanishes too while policy == reference
    assert record["grad_norm"] == 0.0 and record["loss"] == 0.0 and record["kl"] == pytest.approx(0.0, abs=1e-6)
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_ppo_epochs_and_kl_reference(base_checkpoint, tmp_path) -> None:
    config = _config(base_checkpoint, tmp_path / "rl", grpo={"ppo_epochs": 3, "kl_coef": 0.05, "clip_eps": 0.01})
    trainer = RLTrainer(config, reward_fn=first_token_reward, progress=False)
    assert trainer.reference is not None
    record = trainer.train_step()
    # later epochs see a moved policy against the fixed old log-probs: ratio ≠ 1, some tokens clipped, KL > 0
    assert record["ratio_mean"] != pytest.approx(1.0, abs=1e-6) and record["kl"] > 0
    assert record["clip_frac"] > 0
    ref = dict(trainer.reference.named_parameters())
    from nemotron3 import load_model

    for n, p in load_model(base_checkpoint).named_parameters():
        assert torch.equal(ref[n], p), n  # the reference stays the initial model


def test_truncated_importance_weights_option_runs(base_checkpoint, tmp_path) -> None:
    trainer = RLTrainer(_config(base_checkpoint, tmp_path / "rl", grpo={"tis_cap": 2.0}),
                        reward_fn=first_token_reward, progress=False)  # fmt: skip
    assert trainer.train_step()["grad_norm"] > 0


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"rollout": {"group_size": 1}}, "rollout.group_size"),
        ({"rollout": {"domains": ["poetry"]}}, "rollout.domains"),
        ({"rollout": {"temperature": 0}}, "rollout.temperature"),
        ({"grpo": {"loss_agg": "sum"}}, "grpo.loss_agg"),
        ({"grpo": {"ppo_epochs": 0}}, "grpo.ppo_epochs"),
        ({"grpo": {"kl_coef": -1}}, "grpo.kl_coef"),
        ({"grpo": {"tis_cap": 2.0}, "rollout": {"temperature": 0.7}}, "grpo.tis_cap"),
        ({"grpo": {"klcoef": 0.1}}, "grpo.klcoef"),
        ({"optim": {"lr": 0}}, "optim.lr"),
        ({"run": {"steps": 0}}, "run.steps"),
        ({"reward": {}}, "reward"),
    ],
)
def test_config_errors_name_the_key(raw, key) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        RLConfig.from_dict(raw)


def test_cli_rl_and_recipe(base_checkpoint, tmp_path, capsys) -> None:
    import yaml

    recipe = tmp_path / "rl.yaml"
    recipe.write_text(yaml.safe_dump(_config(base_checkpoint, tmp_path / "cli").to_dict()))
    assert main(["train", "rl", "--config", str(recipe), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 1 and (Path(summary["model_dir"]) / "config.json").is_file()
    assert main(["train", "rl", "--config", str(recipe), "--set", "grpo.clip_eps=-1"]) == 2
    assert "grpo.clip_eps" in capsys.readouterr().err
    shipped = RLConfig.from_file(ROOT / "recipes" / "rl.yaml")
    assert shipped.grpo.ppo_epochs == 1 and shipped.rollout.group_size >= 2


# ------------------------------------------------------------------ async rollouts, resume, MTP


def _small(base: Path, out: Path, **sections) -> RLConfig:
    """A 3-step config small enough for seconds-long async / resume tests."""
    raw = {"rollout": {"prompts_per_step": 2, "max_tokens": 6, **sections.pop("rollout", {})},
           "run": {"steps": 3, "threads": 1, **sections.pop("run", {})}}  # fmt: skip
    return _config(base, out, **raw, **sections)


def _reference_sync_step(trainer: RLTrainer) -> None:
    """The synchronous on-policy GRPO step as written before async rollouts existed (ppo_epochs 1, no KL,
    no tis): the default path must keep producing exactly these weights."""
    from nemotron3.train.objectives import group_advantages, grpo_loss

    g = trainer.cfg.grpo
    batch = trainer.rollout(trainer.step)
    keep = [i for i, c in enumerate(batch.completion_ids) if c]
    adv = group_advantages(batch.rewards, normalize_std=g.normalize_std).reshape(-1)[keep]
    ids, mask = pad_sequences([batch.prompt_ids[i] for i in keep], [batch.completion_ids[i] for i in keep])
    trainer.model.train()
    logprobs = sequence_logprobs(trainer.model, ids, trainer.cfg.rollout.temperature)
    loss, _ = grpo_loss(logprobs, logprobs.detach(), None, adv, mask, clip_eps=g.clip_eps,
                        clip_eps_high=g.clip_eps_high, loss_agg=g.loss_agg)  # fmt: skip
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in trainer.model.parameters() if p.grad is not None],
                                   trainer.cfg.optim.grad_clip)  # fmt: skip
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.step += 1


def test_max_staleness_zero_is_the_synchronous_path(base_checkpoint, tmp_path) -> None:
    ours = RLTrainer(_small(base_checkpoint, tmp_path / "a", rollout={"max_staleness": 0}),
                     reward_fn=first_token_reward, progress=False)  # fmt: skip
    reference = RLTrainer(_small(base_checkpoint, tmp_path / "b"), reward_fn=first_token_reward, progress=False)
    for _ in range(2):
        record = ours.train_step()
        _reference_sync_step(reference)
        assert record["staleness"] == 0 and record["policy_version"] == record["step"] - 1
        assert record["ratio_mean"] == 1.0 and record["clip_frac"] == 0.0
    assert ours.producer is None  # no thread in synchronous mode
    for n, p in reference.model.named_parameters():
        assert torch.equal(ours.model.get_parameter(n), p), n


def _no_producer_thread() -> bool:
    import threading

    return not any(t.name == "rl-rollout-producer" and t.is_alive() for t in threading.enumerate())


def test_async_rollouts_are_stale_by_one_and_corrected(base_checkpoint, tmp_path) -> None:
    config = _small(base_checkpoint, tmp_path / "a", rollout={"max_staleness": 1}, grpo={"clip_eps": 0.01},
                    optim={"lr": 3e-2})  # fmt: skip
    trainer = RLTrainer(config, reward_fn=first_token_reward, progress=False)
    trainer.producer_timeout_s = 120.0
    records, versions = [], [_weights(trainer.model)]
    for _ in range(3):
        records.append(trainer.train_step())
        versions.append(_weights(trainer.model))
    batch2 = trainer.last_batch
    trainer.close()
    assert _no_producer_thread()
    assert [r["policy_version"] for r in records] == [0, 0, 1] and [r["staleness"] for r in records] == [0, 1, 1]
    assert records[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and records[0]["clip_frac"] == 0.0
    assert records[1]["ratio_mean"] != pytest.approx(1.0, abs=1e-4)  # the policy moved since version 0 …
    assert max(r["clip_frac"] for r in records[1:]) > 0  # … and the clip acts on the stale tokens
    # batch 2 is exactly what version 1 samples synchronously at step 2
    sync = RLTrainer(_small(base_checkpoint, tmp_path / "s"), reward_fn=first_token_reward, progress=False)
    with torch.no_grad():
        for n, p in sync.model.named_parameters():
            p.copy_(versions[1][n])
    assert sync.rollout(2).completion_ids == batch2.completion_ids
    # and an async run is reproducible
    again = RLTrainer(replace_out(config, tmp_path / "b"), reward_fn=first_token_reward, progress=False)
    again.run()
    for n, p in again.model.named_parameters():
        assert torch.equal(p.detach(), versions[3][n]), n
    assert _no_producer_thread()


def replace_out(config: RLConfig, out: Path) -> RLConfig:
    import dataclasses

    return dataclasses.replace(config, run=dataclasses.replace(config.run, out_dir=str(out)))


def test_producer_stops_on_errors(base_checkpoint, tmp_path) -> None:
    def failing_reward(instance, text, ids) -> float:
        if instance.prompt in failing:
            raise KeyError("scripted reward failure")
        return 0.0

    config = _small(base_checkpoint, tmp_path / "a", rollout={"max_staleness": 2})
    failing = {x.prompt for x in step_instances(config, 1)}
    trainer = RLTrainer(config, reward_fn=failing_reward, progress=False)
    trainer.producer_timeout_s = 120.0
    with pytest.raises(RuntimeError, match="producer failed on step 1") as error:
        trainer.run()
    assert isinstance(error.value.__cause__, KeyError)
    assert trainer.producer is None and _no_producer_thread()
    # an error on the trainer side stops the producer too
    trainer = RLTrainer(replace_out(config, tmp_path / "b"), progress=False)

    def broken_update(batch):
        raise ValueError("scripted update failure")

    trainer.update = broken_update
    with pytest.raises(ValueError, match="scripted update failure"):
        trainer.run()
    assert trainer.producer is None and _no_producer_thread()


def test_resume_reproduces_the_straight_run(base_checkpoint, tmp_path) -> None:
    from nemotron3.train.rl import rl

    straight = RLTrainer(_small(base_checkpoint, tmp_path / "a", run={"steps": 4}), reward_fn=first_token_reward,
                         progress=False)  # fmt: skip
    straight.run()
    half = _small(base_checkpoint, tmp_path / "b", run={"steps": 2})
    RLTrainer(half, reward_fn=first_token_reward, progress=False).run()
    files = {p.name for p in (tmp_path / "b" / "checkpoints").rglob("*") if p.is_file()}
    assert files == {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"}
    with pytest.raises(FileExistsError, match="--resume"):
        rl(_small(base_checkpoint, tmp_path / "b", run={"steps": 4, "export_dir": str(tmp_path / "x")}))
    resumed = RLTrainer(_small(base_checkpoint, tmp_path / "b", run={"steps": 4}), reward_fn=first_token_reward,
                        progress=False, resume=True)  # fmt: skip
    assert resumed.step == 2
    resumed.run()
    for n, p in straight.model.named_parameters():
        assert torch.equal(resumed.model.get_parameter(n), p), n
    timing = ("rollout_s", "update_s")
    logged = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for a, b in zip(straight.trace, logged):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    with pytest.raises(ValueError, match="rollout"):  # a changed recipe is refused
        RLTrainer(_small(base_checkpoint, tmp_path / "b", rollout={"temperature": 0.5}), progress=False, resume=True)


def test_async_resume_restarts_the_producer_from_the_checkpoint(base_checkpoint, tmp_path) -> None:
    config = _small(base_checkpoint, tmp_path / "a", rollout={"max_staleness": 1}, run={"steps": 2})
    RLTrainer(config, reward_fn=first_token_reward, progress=False).run()
    resumed = RLTrainer(_small(base_checkpoint, tmp_path / "a", rollout={"max_staleness": 1}, run={"steps": 4}),
                        reward_fn=first_token_reward, progress=False, resume=True)  # fmt: skip
    resumed.run()
    assert [r["policy_version"] for r in resumed.trace] == [0, 0, 2, 2]  # the in-flight batch 2 is regenerated
    assert [r["staleness"] for r in resumed.trace] == [0, 1, 0, 1]
    assert _no_producer_thread()


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_mtp_is_trained_only_with_a_loss_weight(base_checkpoint, tmp_path, weight) -> None:
    trainer = RLTrainer(_small(base_checkpoint, tmp_path / "a", mtp={"loss_weight": weight}),
                        reward_fn=first_token_reward, progress=False)  # fmt: skip
    assert trainer.model.mtp is not None
    before = _weights(trainer.model)
    grads = {}
    for n, p in trainer.model.named_parameters():
        if n.startswith("mtp."):
            p.register_hook(lambda g, n=n: grads.__setitem__(n, float(g.norm())))
    record = trainer.train_step()
    mtp_changed = [n for n, p in trainer.model.named_parameters()
                   if n.startswith("mtp.") and not torch.equal(p.detach(), before[n])]  # fmt: skip
    if weight == 0:
        assert not grads and not mtp_changed and "mtp_loss" not in record
    else:
        assert record["mtp_loss"] > 0 and mtp_changed and max(grads.values()) > 0


def test_cli_rl_resume(base_checkpoint, tmp_path, capsys) -> None:
    import yaml

    recipe = tmp_path / "rl.yaml"
    recipe.write_text(yaml.safe_dump(_small(base_checkpoint, tmp_path / "cli", run={"steps": 1}).to_dict()))
    assert main(["train", "rl", "--config", str(recipe), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "rl", "--config", str(recipe), "--no-progress", "--resume", "--set", "run.steps=2"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
    assert [json.loads(x)["step"] for x in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
