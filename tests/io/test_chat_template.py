"""Tokenizer.apply_chat_template renders the checkpoint's template exactly as our reference renderer."""

from __future__ import annotations

import pytest

from nemotron3.io.tokenizer import Tokenizer
from nemotron3.train.tasks import generate
from nemotron3.train.tokenizer import render_chat, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    root = tmp_path_factory.mktemp("tok")
    (root / "text.txt").write_text("hello world, what is 1 + 2? " * 50)
    return Tokenizer.from_dir(train_tokenizer([root / "text.txt"], 300, root / "out"))


def test_apply_chat_template_matches_reference(tokenizer: Tokenizer) -> None:
    for x in generate("tool_use", 3, seed=1) + generate("arithmetic", 2, seed=1):
        messages = x.as_messages(system="Be brief.")
        for thinking in (True, False):
            ours = tokenizer.apply_chat_template(messages, tools=x.tools or None, add_generation_prompt=False,
                                                 enable_thinking=thinking)  # fmt: skip
            ref = render_chat(messages, tools=x.tools or None, enable_thinking=thinking)
            assert ours == ref


def test_missing_template_is_a_clear_error(tokenizer: Tokenizer) -> None:
    bare = Tokenizer(tokenizer._tok)
    with pytest.raises(ValueError, match="chat_template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
