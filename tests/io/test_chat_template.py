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


CONTINUED = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is "}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Sure"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 2?"}],
]


@pytest.mark.parametrize("messages", CONTINUED)
@pytest.mark.parametrize("thinking", [True, False])
def test_continue_final_message_matches_transformers(messages, thinking) -> None:
    """The default model's template, rendered by transformers (the reference) and by us, ends right after the
    final message's content."""
    import json
    from pathlib import Path

    transformers = pytest.importorskip("transformers")
    from nemotron3.default_model import resolve_model

    d = Path(resolve_model("default"))
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    ref.chat_template = json.loads((d / "tokenizer_config.json").read_text())["chat_template"]
    want = ref.apply_chat_template(messages, tokenize=False, continue_final_message=True, enable_thinking=thinking)
    got = Tokenizer.from_dir(d).apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True,
                                                    enable_thinking=thinking)  # fmt: skip
    assert got == want and got.endswith(messages[-1]["content"].rstrip())


def test_a_template_passed_in_replaces_the_checkpoints(tokenizer: Tokenizer) -> None:
    template = (
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tokenizer.apply_chat_template(messages, chat_template=template) == "[user] hi\n[assistant] yo\n>"
    assert Tokenizer(tokenizer._tok).apply_chat_template(messages, chat_template=template).endswith(">")


@pytest.mark.parametrize(
    "messages, options, match",
    [
        ([{"role": "user", "content": "hi"}], {"continue_final_message": True}, "cannot both be true"),
        ([{"role": "user", "content": [{"type": "text"}]}], {"continue_final_message": True,
                                                             "add_generation_prompt": False}, "non-empty text"),
    ],
)
def test_continue_final_message_refusals_say_why(tokenizer: Tokenizer, messages, options, match) -> None:
    with pytest.raises(ValueError, match=match):
        tokenizer.apply_chat_template(messages, **options)
