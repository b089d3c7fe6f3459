"""The byte-level BPE trainer: special tokens, digits, round trips, determinism, loaders, chat template."""

from __future__ import annotations

import json

import pytest

from nemotron3.io.tokenizer import Tokenizer
from nemotron3.train.tokenizer import (
    CONTROL_TOKENS,
    DOC_END_ID,
    IM_END_ID,
    MARKUP_TOKENS,
    SPECIAL_TOKENS,
    render_chat,
    train_tokenizer,
)

TEXT = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n"
    "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date.\n"
    "In 1609 the sonnets were printed; 154 of them, 2155 lines in all.\n"
)
VOCAB = 400


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok_corpus")
    a, b = root / "a.txt", root / "b.txt"
    a.write_text((TEXT * 20 + "\f\n") * 3)
    b.write_text(TEXT.upper() * 10)
    return [a, b]


@pytest.fixture(scope="module")
def tok_dir(corpus_files, tmp_path_factory):
    return train_tokenizer(corpus_files, VOCAB, tmp_path_factory.mktemp("tok"), model_max_length=512)


def test_special_tokens_have_fixed_ids_and_flags(tok_dir):
    data = json.loads((tok_dir / "tokenizer.json").read_text())
    added = {t["content"]: t for t in data["added_tokens"]}
    assert [added[t]["id"] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert all(added[t]["special"] for t in CONTROL_TOKENS)
    assert not any(added[t]["special"] for t in MARKUP_TOKENS)
    assert data["normalizer"] is None and data["decoder"]["type"] == "ByteLevel"


def test_io_tokenizer_loads_it(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    assert tok.vocab_size == VOCAB
    assert (tok.eos_token_id, tok.bos_token_id) == (IM_END_ID, 1)
    ids = tok.encode("<|im_start|>user\nhi<|im_end|></s><think>x</think><tool_call>")
    for token in ("<|im_start|>", "<|im_end|>", "</s>", "<think>", "</think>", "<tool_call>"):
        assert SPECIAL_TOKENS.index(token) in ids
    assert DOC_END_ID == SPECIAL_TOKENS.index("</s>")
    # control tokens vanish when skipping specials; reasoning/tool markup stays for the parsers
    assert tok.decode(ids) == "user\nhi<think>x</think><tool_call>"


def test_byte_level_round_trip_and_single_digits(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    text = "naïve café — 😀\ttabs\r\n  spaces  and 12345 ½ \x00 end"
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    digits = tok.encode("9081726354")
    assert len(digits) == 10 and tok.decode(digits) == "9081726354"
    assert len(tok.encode("summer")) < len("summer")  # merges were learned


def test_training_is_deterministic(corpus_files, tok_dir, tmp_path):
    again = train_tokenizer(corpus_files, VOCAB, tmp_path / "again", model_max_length=512)
    assert (again / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert (again / "tokenizer_config.json").read_bytes() == (tok_dir / "tokenizer_config.json").read_bytes()


def test_form_feeds_separate_documents_and_are_not_learned(tok_dir):
    """Documents reach the trainer without their form-feed separators: no merge contains that byte."""
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    form_feed = "\u010c"  # the byte-level symbol of b"\x0c"
    assert form_feed in vocab
    assert not [token for token in vocab if form_feed in token and token != form_feed]
    assert any("\u0120summer" == token for token in vocab)  # while words of the documents were merged


def test_config_for_transformers(tok_dir):
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["bos_token"] == "<s>" and config["pad_token"] == "<pad>"
    assert config["model_max_length"] == 512 and config["chat_template"]


def test_transformers_loads_it_and_renders_like_render_chat(tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    ours = Tokenizer.from_dir(tok_dir)
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (IM_END_ID, 0, 1)
    assert hf.model_max_length == 512
    assert hf("Thou art 1609 lines", add_special_tokens=True)["input_ids"] == ours.encode("Thou art 1609 lines")
    messages = _tool_conversation()
    for kwargs in ({}, {"enable_thinking": False}, {"truncate_history_thinking": False}):
        expected = render_chat(messages, tools=[_TOOL], add_generation_prompt=True, **kwargs)
        got = hf.apply_chat_template(messages, tools=[_TOOL], tokenize=False, add_generation_prompt=True, **kwargs)
        assert got == expected


_TOOL = {"type": "function", "function": {"name": "calculator", "description": "Evaluate.",
         "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                        "required": ["expression"]}}}  # fmt: skip


def _tool_conversation() -> list[dict]:
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2 * 3", "n": [1]}}}
    return [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "2*3?"},
        {"role": "assistant", "content": "", "reasoning_content": "use the tool", "tool_calls": [call]},
        {"role": "tool", "content": '{"result": 6}'},
        {"role": "tool", "content": '{"note": "second"}'},
        {"role": "assistant", "content": "6", "reasoning_content": "it said 6"},
        {"role": "user", "content": "and 3*3?"},
    ]


def test_chat_template_follows_nemotron3_conventions():
    text = render_chat(_tool_conversation(), tools=[_TOOL], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nBe exact.\n\n# Tools\n")
    assert "<tools>\n<function>\n<name>calculator</name>" in text
    # reasoning before the last user turn is dropped by default; the call itself stays
    assert "use the tool" not in text and "it said 6" not in text
    assert "<|im_start|>assistant\n<think></think>\n<tool_call>\n<function=calculator>\n" in text
    assert "<parameter=expression>\n2 * 3\n</parameter>\n<parameter=n>\n[1]\n</parameter>\n</function>\n" in text
    # both tool results share one user turn
    assert ("<|im_start|>user\n<tool_response>\n{\"result\": 6}\n</tool_response>\n<tool_response>\n"
            "{\"note\": \"second\"}\n</tool_response>\n<|im_end|>\n") in text  # fmt: skip
    assert "<|im_start|>assistant\n<think></think>6<|im_end|>\n" in text
    assert text.endswith("<|im_start|>user\nand 3*3?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    kept = render_chat(_tool_conversation(), truncate_history_thinking=False)
    assert "<think>\nuse the tool\n</think>\n<tool_call>" in kept and "<think>\nit said 6\n</think>\n6" in kept
    no_think = render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True, enable_thinking=False)
    assert (
        no_think
        == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think></think>"
    )


def test_bad_inputs_are_named(tmp_path, corpus_files):
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(corpus_files, 100, tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([tmp_path / "missing.txt"], VOCAB, tmp_path / "t")
    with pytest.raises(ValueError, match="at least one"):
        train_tokenizer([], VOCAB, tmp_path / "t")
