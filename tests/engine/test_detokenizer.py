"""IncrementalDetokenizer against decoding the whole list at every step, with characters split across tokens."""

from __future__ import annotations

import random

import pytest

from nemotron3.default_model import resolve_model
from nemotron3.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer
from nemotron3.io.tokenizer import Tokenizer

TEXT = "Grüße aus Köln! 東京は晴れ ☀️, naïve café — 😀👍🏽 ok.\n<|im_end|> done"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(resolve_model("default"))


def sequences(tok: Tokenizer) -> list[list[int]]:
    """The multilingual text (byte tokens for its rare characters), and random token lists over the vocabulary."""
    rng = random.Random(0)
    rand = [[rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 120))] for _ in range(40)]
    return [tok.encode(TEXT), tok.encode(TEXT * 3), *rand]


@pytest.mark.parametrize("skip", [True, False])
def test_text_is_the_whole_decode_without_its_unfinished_character(tok, skip):
    split = 0
    for ids in sequences(tok):
        d = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        for n in range(1, len(ids) + 1):
            text = d.add(ids[:n])
            whole = tok.decode(ids[:n], skip_special_tokens=skip)
            assert whole.startswith(text)  # what it shows never changes later
            if whole.endswith(REPLACEMENT):
                split += 1  # a character missing bytes: held back (with the rest of its window)
            else:
                assert text == whole  # nothing held back once the text ends in a whole character
        assert d.add(ids, final=True) == tok.decode(ids, skip_special_tokens=skip)
    assert split > 0  # the inputs did split characters across tokens


def test_tokens_added_several_at_a_time(tok):
    ids = tok.encode(TEXT * 2)
    d = IncrementalDetokenizer(tok)
    for n in range(3, len(ids) + 3, 3):  # speculative decoding appends a few tokens per step
        d.add(ids[:n])
    assert d.add(ids, final=True) == tok.decode(ids)


class Script:
    """A logits processor that forces the next token of a script (one per call; it keeps its place)."""

    def __init__(self, ids: list[int]) -> None:
        self.ids, self.at = ids, 0

    def __call__(self, logits):
        forced = logits.new_full(logits.shape, float("-inf"))
        forced[self.ids[min(self.at, len(self.ids) - 1)]] = 0.0
        return forced

    def accept(self, token_id: int) -> None:
        self.at += 1


def test_streamed_text_never_shows_half_a_character(tok):
    """The default model, forced to write TEXT token by token (its rarer characters come as byte tokens): the
    streamed deltas add up to the final text, which is decode(ids), and no delta carries a U+FFFD."""
    from nemotron3 import LLM, SamplingParams

    ids = [t for t in tok.encode(TEXT) if t != tok.eos_token_id]
    assert any(tok.decode(ids[:n]).endswith(REPLACEMENT) for n in range(1, len(ids)))  # characters do split
    llm = LLM("default", kv_cache_memory_bytes=16 << 20, max_num_seqs=2)
    params = SamplingParams(max_tokens=len(ids), ignore_eos=True, skip_special_tokens=False,
                            logits_processors=[Script(ids)])  # fmt: skip
    deltas = [d.outputs[0] for d in llm.stream("Write:", params)]
    assert [t for d in deltas for t in d.token_ids] == ids
    assert all(REPLACEMENT not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == tok.decode(ids, skip_special_tokens=False)
