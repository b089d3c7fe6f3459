"""Shared pytest setup: make `tests.*` importable (test helpers and references live in the tree)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def make_hf_checkpoint(tmp_path):
    """Factory: make_hf_checkpoint(config, seed=0, **perturb) -> (directory, transformers model).

    Builds a random `transformers` NemotronHForCausalLM for a nemotron3 ModelConfig, perturbs it so
    nothing is trivially zero or one (tests/model/helpers.py: perturb_weights) and saves it with
    `save_pretrained` into a fresh directory under tmp_path. Nothing is downloaded.
    """
    from tests.model.helpers import save_random_hf_checkpoint

    counter = iter(range(10**6))

    def make(config, seed: int = 0, **perturb):
        directory = tmp_path / f"hf_ckpt_{next(counter)}"
        return directory, save_random_hf_checkpoint(config, directory, seed=seed, **perturb)

    return make
