"""`nemotron3 train pretrain` under torchrun (2 gloo ranks, FSDP2 + expert parallel) vs one process.

Same recipe, same global batch: the loss trace must agree within 1e-4 relative. The two runs do the same
arithmetic in another order (per-rank partial sums, FSDP's reduce-scatter, expert rows exchanged by
all-to-all), ~1e-7 relative per step (tests/train/test_distributed.py measures ≤ 3e-7 over 5 steps);
Adam's normalised update amplifies such differences in nearly-zero gradient elements, so after 4 steps
of the full recipe (MTP, aux loss, bias updates) 1e-4 still fails on any real error (a lost gradient or
misrouted token moves the loss by > 1e-3). The exported model and a resumed sharded run are checked too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nemotron3 import load_model
from nemotron3.train.config import PretrainConfig
from nemotron3.train.pretrain import Pretrainer
from tests.train.test_pretrain import _write_corpus

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe(tmp: Path, out: Path, steps: int = 4) -> dict:
    train, valid = _write_corpus(tmp)
    return {
        "model": {"preset": "tiny"},
        "data": {"corpus_dir": None, "train_files": [str(train)], "valid_files": [str(valid)], "vocab_size": 320,
                 "seq_len": 32, "batch_size": 4, "valid_sequences": 4, "shuffle_buffer": 16},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "run": {"steps": steps, "out_dir": str(out), "checkpoint_every": 2, "eval_every": 2},
    }  # fmt: skip


def _torchrun(recipe: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "nemotron3", "train", "pretrain", "--config", str(recipe),
           "--no-progress", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "event" not in r]


def test_two_rank_pretrain_matches_one_process(tmp_path: Path) -> None:
    raw = _recipe(tmp_path, tmp_path / "dist")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    proc = _torchrun(tmp_path / "recipe.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist_losses = _losses(tmp_path / "dist")

    raw["run"]["out_dir"] = str(tmp_path / "single")
    single = Pretrainer(PretrainConfig.from_dict(raw), progress=False)
    single.run()
    single_losses = [r["loss"] for r in single.trace]
    assert len(dist_losses) == len(single_losses) == 4
    assert dist_losses == pytest.approx(single_losses, rel=1e-4)

    exported = load_model(tmp_path / "dist" / "model")  # gathered from the shards into one checkpoint
    reference = single.model.state_dict()
    for name, tensor in exported.state_dict().items():
        assert tensor.shape == reference[name].shape, name

    # resume the sharded run from its step-2 checkpoint: the last two steps repeat exactly
    (tmp_path / "dist" / "checkpoints" / "step_000004").rename(tmp_path / "step4")
    proc = _torchrun(tmp_path / "recipe.yaml", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(tmp_path / "dist") == dist_losses
