"""The embedded default model: what every command and `load_model("default")` use when no model is named.

A ~10M-parameter Nemotron-3-architecture model (Mamba-2 + attention + LatentMoE + one MTP block) trained
by `recipes/default.yaml` on the offline Shakespeare corpus plus synthetic tasks (docs/training.md),
shipped inside the package in the `nemotron_h` format with its tokenizer and chat template.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "default"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default-model"


def resolve_model(spec: str | os.PathLike | None) -> str | os.PathLike:
    """`None` or "default" → the embedded checkpoint's directory; anything else unchanged."""
    if spec is None or (isinstance(spec, str) and spec == DEFAULT_MODEL_NAME):
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; reinstall nemotron3 or "
                "train it with `nemotron3 train pretrain --config recipes/default.yaml`"
            )
        return str(DEFAULT_MODEL_DIR)
    return spec
