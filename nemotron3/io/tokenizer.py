"""Tokenizer: a checkpoint's tokenizer.json (Hugging Face `tokenizers`) plus its special-token ids."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    """Encode/decode with the checkpoint's byte-level BPE; eos/bos from tokenizer_config.json when present."""

    def __init__(self, tokenizer: _HFTokenizer, eos_token: str | None = None, bos_token: str | None = None) -> None:
        self._tok = tokenizer
        self.eos_token_id = tokenizer.token_to_id(eos_token) if eos_token else None
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        cfg_path = directory / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        return cls(_HFTokenizer.from_file(str(path)), _token_str(cfg.get("eos_token")), _token_str(cfg.get("bos_token")))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def _token_str(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value
