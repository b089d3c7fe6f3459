"""A tiny random-weight chat checkpoint (with tokenizer) shared by the evaluation tests."""

from __future__ import annotations

import pytest

from tests.train.helpers import tiny_chat_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    """Directory of a tiny-preset model with seeded random weights and a 512-token chat tokenizer."""
    return str(tiny_chat_checkpoint(tmp_path_factory.mktemp("eval_ckpt")))
