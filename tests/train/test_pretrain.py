"""The pretraining loop end to end on a tiny model and a small local corpus (no download).

Covers: exact resume (bitwise the same loss trace and weights), spike detection with rollback on an
injected spike, fp32 vs bf16 gradient reduction, export in the nemotron_h format, recipe errors, CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nemotron3 import load_model
from nemotron3.cli import main
from nemotron3.train.config import PretrainConfig
from nemotron3.train.pretrain import Pretrainer, SpikeDetector
from nemotron3.train.tasks import generate, render_plain
from nemotron3.train.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _write_corpus(root: Path) -> tuple[Path, Path]:
    """About 60 KB of task text as a train file and 6 KB as a held-out file (corpus format)."""
    docs = [render_plain(t) for d in ("arithmetic", "sorting") for t in generate(d, 120, seed=3)]
    train, valid = root / "train.txt", root / "valid.txt"
    train.write_text("\f".join(docs[:200]), encoding="utf-8")
    valid.write_text("\f".join(docs[200:]), encoding="utf-8")
    return train, valid


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(train file, valid file, tokenizer dir): the tokenizer is trained once, as a run would train it."""
    root = tmp_path_factory.mktemp("corpus")
    train, valid = _write_corpus(root)
    return train, valid, train_tokenizer([train], 320, root / "tokenizer")


def _config(corpus: tuple[Path, Path, Path], out: Path, **sections) -> PretrainConfig:
    raw = {
        "model": {"preset": "tiny"},
        "data": {"corpus_dir": None, "train_files": [str(corpus[0])], "valid_files": [str(corpus[1])],
                 "tokenizer": str(corpus[2]),
                 "task_documents": 20, "task_domains": ["arithmetic"], "vocab_size": 320, "seq_len": 32,
                 "batch_size": 4, "valid_sequences": 4, "shuffle_buffer": 16},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "run": {"steps": 6, "out_dir": str(out), "checkpoint_every": 3, "eval_every": 3, "keep_checkpoints": 3},
    }  # fmt: skip
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return PretrainConfig.from_dict(raw)


def test_resume_reproduces_the_uninterrupted_run_bitwise(corpus, tmp_path) -> None:
    full = Pretrainer(_config(corpus, tmp_path / "a", data={"tokenizer": None}), progress=False)
    full.run()
    assert (tmp_path / "a" / "tokenizer" / "tokenizer.json").is_file()  # trained into the run directory
    cut = Pretrainer(_config(corpus, tmp_path / "b", data={"tokenizer": None}), progress=False)
    cut.run(stop_after=3)
    assert [r["step"] for r in cut.trace] == [0, 1, 2]
    resumed = Pretrainer(_config(corpus, tmp_path / "b", data={"tokenizer": None}), resume=True, progress=False)
    assert resumed.step == 3 and resumed.consumed == 3
    resumed.run()
    assert [r["loss"] for r in cut.trace + resumed.trace] == [r["loss"] for r in full.trace]
    assert [r["grad_norm"] for r in resumed.trace] == [r["grad_norm"] for r in full.trace[3:]]
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    logged = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(6))  # no duplicated steps after resume


def test_injected_spike_rolls_back_and_lowers_the_lr(corpus, tmp_path) -> None:
    cfg = _config(corpus, tmp_path / "spike", run={"steps": 9, "checkpoint_every": 3},
                  spike={"window": 4, "inject_at": 5, "lr_factor": 0.5, "patience": 2, "min_rise": 0.2})  # fmt: skip
    trainer = Pretrainer(cfg, progress=False)
    summary = trainer.run()
    assert summary["rollbacks"] == 1 and trainer.lr_scale == 0.5
    events = [json.loads(x) for x in (tmp_path / "spike" / "metrics.jsonl").read_text().splitlines()]
    rollback = [e for e in events if e.get("event") == "rollback"]
    skipped = [e for e in events if e.get("event") == "skipped_batch"]
    assert [e["at_step"] for e in skipped] == [5]  # the first high loss only skips its batch …
    assert rollback and rollback[0]["at_step"] == 5 and rollback[0]["resumed_step"] == 3  # … the second rolls back
    assert [r["step"] for r in trainer.trace] == list(range(9))
    before = [r["loss"] for r in trainer.trace if r["step"] < 5]
    assert max(r["loss"] for r in trainer.trace) < rollback[0]["loss"]  # the spiked step never landed
    assert trainer.trace[-1]["loss"] < 2 * max(before)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_spike_detector_rule() -> None:
    from nemotron3.train.config import SpikeSection

    det = SpikeDetector(SpikeSection(window=6, threshold=3.0, min_rise=0.1, patience=2))
    assert det.check(100.0) == "ok"  # too little history to judge
    for x in (5.0, 4.9, 4.8, 4.85, 4.7, 4.75):
        det.accept(x)
    assert det.check(5.0) == "ok"
    assert det.check(5.3) == "ok"  # above median + 3σ but within min_rise of the median: a noisy batch
    assert det.check(6.0) == "skip" and det.check(6.0) == "spike"  # patience 2: the second in a row
    assert det.check(6.0) == "skip" and det.check(5.0) == "ok" and det.check(6.0) == "skip"  # streak resets
    assert det.check(float("nan")) == "spike"  # non-finite: at once


def test_bf16_gradient_reduction_differs_from_fp32_but_stays_close(corpus, tmp_path) -> None:
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = _config(corpus, tmp_path / dtype, data={"micro_batch_size": 1}, run={"steps": 4},
                      precision={"grad_reduce_dtype": dtype})  # fmt: skip
        trainer = Pretrainer(cfg, progress=False)
        trainer.run()
        losses[dtype] = [r["loss"] for r in trainer.trace]
    assert losses["float32"][0] == losses["bfloat16"][0]  # same weights before the first update
    assert losses["float32"][1:] != losses["bfloat16"][1:]
    assert max(abs(a - b) for a, b in zip(losses["float32"], losses["bfloat16"])) < 0.05


def test_micro_batches_accumulate_to_the_full_batch_gradient(corpus, tmp_path) -> None:
    """Normalising by global label counts makes 4 micro-batches of 1 equal one batch of 4 (fp32 rounding)."""
    norms = {}
    for micro in (0, 1):
        cfg = _config(corpus, tmp_path / f"m{micro}", data={"micro_batch_size": micro}, run={"steps": 1},
                      moe={"seq_aux_loss_coef": 0.0})  # fmt: skip
        trainer = Pretrainer(cfg, progress=False)
        trainer.run()
        norms[micro] = (trainer.trace[0]["loss"], trainer.trace[0]["grad_norm"])
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)


def test_export_loads_and_matches_the_trained_model(corpus, tmp_path) -> None:
    trainer = Pretrainer(_config(corpus, tmp_path / "exp", run={"steps": 2}), progress=False)
    summary = trainer.run()
    exported = load_model(summary["model_dir"])
    ids = torch.randint(0, trainer.model_config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trainer.model(ids).logits, rtol=0, atol=0)
    assert (Path(summary["model_dir"]) / "tokenizer.json").is_file()
    assert (tmp_path / "exp" / "loss.png").stat().st_size > 1000


def test_fake_quant_training_runs(corpus, tmp_path) -> None:
    cfg = _config(corpus, tmp_path / "fq", model={"overrides": {"pattern": "MEM*E-M"}}, run={"steps": 2},
                  precision={"fake_quant": "nvfp4"})  # fmt: skip
    trainer = Pretrainer(cfg, progress=False)
    summary = trainer.run()
    assert summary["fake_quant_layers"] > 0 and torch.isfinite(torch.tensor(summary["final_loss"]))


def test_recipe_errors_name_the_problem(corpus, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"optim.lrr"):
        PretrainConfig.from_dict({"optim": {"lrr": 1}})
    with pytest.raises(ValueError, match="unknown recipe section"):
        PretrainConfig.from_dict({"optimizer": {}})
    with pytest.raises(ValueError, match="micro_batch_size"):
        PretrainConfig.from_dict({"data": {"batch_size": 4, "micro_batch_size": 3}})
    Pretrainer(_config(corpus, tmp_path / "x", run={"steps": 1}), progress=False).run()
    with pytest.raises(FileExistsError, match="--resume"):
        Pretrainer(_config(corpus, tmp_path / "x", run={"steps": 1}), progress=False)
    with pytest.raises(ValueError, match="recipe differs"):
        Pretrainer(_config(corpus, tmp_path / "x", run={"steps": 1}, optim={"lr": 1e-2}), resume=True, progress=False)


def test_recipe_files_yaml_and_toml(tmp_path) -> None:
    (tmp_path / "r.toml").write_text("[run]\nsteps = 7\n[optim]\nbetas = [0.9, 0.99]\n")
    assert PretrainConfig.from_file(tmp_path / "r.toml").run.steps == 7
    assert PretrainConfig.from_file(tmp_path / "r.toml").optim.betas == (0.9, 0.99)
    default = PretrainConfig.from_file(ROOT / "recipes" / "default.yaml")
    assert default.mtp.depths >= 1 and default.data.task_documents > 0
    with pytest.raises(ValueError, match=".yaml"):
        PretrainConfig.from_file(ROOT / "README.md")


def test_cli_pretrain_with_overrides(corpus, tmp_path, capsys) -> None:
    recipe = tmp_path / "recipe.yaml"
    cfg = _config(corpus, tmp_path / "cli").to_dict()
    import yaml

    recipe.write_text(yaml.safe_dump(cfg))
    code = main(["train", "pretrain", "--config", str(recipe), "--set", "run.steps=2", "--no-progress"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
    assert main(["train", "pretrain", "--config", str(recipe), "--set", "run.stepz=2"]) == 2
    assert "run.stepz" in capsys.readouterr().err
