"""Tokenizer: a checkpoint's tokenizer.json (Hugging Face `tokenizers`) plus its special-token ids."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    """Encode/decode with the checkpoint's byte-level BPE; eos/bos from tokenizer_config.json when present."""

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        eos_token: str | None = None,
        bos_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._tok = tokenizer
        self.eos_token_id = tokenizer.token_to_id(eos_token) if eos_token else None
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        cfg_path = directory / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # the named-templates form: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return cls(_HFTokenizer.from_file(str(path)), _token_str(cfg.get("eos_token")),
                   _token_str(cfg.get("bos_token")), template)  # fmt: skip

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        """The vocabulary's strings for token ids (byte-level BPE pieces, e.g. "Ġhello"), as transformers names it."""
        return [self._tok.id_to_token(i) for i in ids]

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        **template_kwargs,
    ) -> str:
        """Render `messages` with the checkpoint's Jinja chat template (sandboxed), or `chat_template` instead, as
        transformers' `apply_chat_template(tokenize=False)`; template_kwargs (e.g. enable_thinking=False) go to the
        template. continue_final_message ends the text right after the last message's content (no end-of-turn), so
        generation continues that message (a prefilled assistant reply), as transformers and vLLM do."""
        template = chat_template or self.chat_template
        if not template:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json); pass chat_template")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        text = _compile(template).render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **template_kwargs
        )
        if not continue_final_message:
            return text
        final = messages[-1].get("content") if messages else None
        if not isinstance(final, str) or not final.strip():
            raise ValueError("continue_final_message needs a final message whose content is non-empty text")
        at = text.rfind(final.strip())
        if at < 0:
            raise ValueError("continue_final_message: the chat template did not render the final message's content")
        kept = final.lstrip() if text.startswith(final.lstrip(), at) else final.strip()  # trailing space, if rendered
        return text[: at + len(kept)]


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """A chat template compiled in a sandboxed Jinja environment set up like transformers' renderer."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return env.from_string(template)


def _token_str(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value
