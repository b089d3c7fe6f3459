"""Incremental detokenization: the text of a sequence's generated tokens, decoding only the newest ones each step.

Decoding all of a sequence's tokens at every step costs time in proportion to its length: with the default
tokenizer 142 µs at 1,000 tokens and 573 µs at 4,000, so 32 sequences at 4,000 tokens spend ~18 ms a step on it,
half of a nemo50 decode step. Here a step decodes a window: the tokens since the last settled point. The window's
text minus the text of its already-read part is what the new tokens add. A window whose text ends in U+FFFD (the
bytes of a character split across tokens, not all there yet) waits for the next token, so the text never shows
a half character that a later token would change. vLLM detokenizes the same way.

The text equals `tokenizer.decode(ids)` whenever that ends in a whole character, and after `final=True` always,
for decoders that decode a concatenation of token lists to the concatenation of their texts at character
boundaries (byte-level BPE, as Nemotron's and our tokenizers are).
"""

from __future__ import annotations

from dataclasses import dataclass

REPLACEMENT = "\ufffd"  # what a decoder writes for the bytes of an incomplete UTF-8 character


@dataclass
class IncrementalDetokenizer:
    """Text of a growing token list. `prefix` and `read` index that list: the text of ids[:read] is settled in
    `text`, and the next window starts at `prefix` (the previous settled point, as left context)."""

    tokenizer: object  # encode / decode(ids, skip_special_tokens)
    skip_special_tokens: bool = True
    text: str = ""
    prefix: int = 0
    read: int = 0

    def add(self, ids: list[int], final: bool = False) -> str:
        """Bring `text` up to `ids` (all tokens so far: the earlier ones unchanged, new ones appended) and return it.
        final: the sequence ends here, so a trailing incomplete character is written as decode writes it."""
        if len(ids) <= self.read:
            return self.text
        before = self._decode(ids[self.prefix : self.read])
        window = self._decode(ids[self.prefix :])
        if not final and (len(window) <= len(before) or window.endswith(REPLACEMENT)):
            return self.text  # nothing printable yet, or a character still missing bytes
        self.text += window[len(before) :]
        self.prefix, self.read = self.read, len(ids)
        return self.text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""
