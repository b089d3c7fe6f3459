"""Shared test fixtures' builders for the post-training tests (RL, MOPD)."""

from __future__ import annotations

import shutil
from pathlib import Path

from nemotron3.config import preset
from nemotron3.io.checkpoint import save_checkpoint
from nemotron3.train.pretrain import build_model
from nemotron3.train.tasks import generate, render_conversation
from nemotron3.train.tokenizer import train_tokenizer

ARITH = {"digits": [1, 2], "operations": ["add"]}
"""Task options of the small arithmetic problems the post-training tests roll out."""


def tiny_chat_checkpoint(root: Path) -> Path:
    """A tiny-preset model with seeded random weights, saved under root/model with a 512-token tokenizer
    (chat template included) trained on 150 arithmetic conversations."""
    docs = [render_conversation(x) for x in generate("arithmetic", 150, 9, **ARITH)]
    (root / "train.txt").write_text("\f".join(docs), encoding="utf-8")
    tokenizer_dir = train_tokenizer([root / "train.txt"], 512, root / "tokenizer")
    out = root / "model"
    config = preset("tiny").replace(vocab_size=512)
    save_checkpoint(build_model(config, seed=0).state_dict(), config, out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_dir / name, out / name)
    return out
