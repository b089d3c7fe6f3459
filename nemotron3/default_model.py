"""The embedded models: "default" (what every command uses when no model is named) and "base".

Both are ~10M-parameter Nemotron-3-architecture models (Mamba-2 + attention + LatentMoE + one MTP block)
shipped inside the package in the `nemotron_h` format with their tokenizer and chat template:
- "base": pretrained by `recipes/default.yaml` on the offline Shakespeare corpus plus synthetic tasks
  (docs/training.md); the post-training chain starts from it;
- "default": the post-trained chat model (benchmarks/posttrain_chain.py: SFT, then multi-teacher on-policy
  distillation; docs/post-training.md).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "default"
BASE_MODEL_NAME = "base"
ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL_DIR = ASSETS / "default-model"
BASE_MODEL_DIR = ASSETS / "base-model"
EMBEDDED = {DEFAULT_MODEL_NAME: DEFAULT_MODEL_DIR, BASE_MODEL_NAME: BASE_MODEL_DIR}


def resolve_model(spec: str | os.PathLike | None) -> str | os.PathLike:
    """`None`, "default" or "base" → that embedded checkpoint's directory; anything else unchanged."""
    name = DEFAULT_MODEL_NAME if spec is None else spec
    if isinstance(name, str) and name in EMBEDDED:
        directory = EMBEDDED[name]
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"the embedded {name} model is missing from {directory}; reinstall nemotron3 or rebuild it "
                "(base: `nemotron3 train pretrain --config recipes/default.yaml`; default: "
                "`python benchmarks/posttrain_chain.py`)"
            )
        return str(directory)
    return spec
