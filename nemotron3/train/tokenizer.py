"""Train a byte-level BPE tokenizer (HF `tokenizers`) with the Nemotron 3 chat special tokens.

What: `train_tokenizer(files, vocab_size, out_dir)` learns BPE merges from local text files and writes
`tokenizer.json` + `tokenizer_config.json` (with the chat template), a directory that both
`nemotron3.io.tokenizer.Tokenizer.from_dir` and transformers' `PreTrainedTokenizerFast.from_pretrained`
load. `render_chat(messages, ...)` renders a conversation with the same template in plain Python/Jinja, so
SFT data can be built without transformers.

Why these choices:
- Byte level (ByteLevel pre-tokenizer + decoder, no normalizer): every byte string round-trips, no `<unk>`.
- Digits are split one per token before the byte-level split (as Llama/DeepSeek tokenizers do): a tiny
  model can then learn column-wise carries for the arithmetic tasks instead of memorising 3-digit chunks.
- Special tokens follow the real Nemotron 3 Nano chat template (`<|im_start|>role ... <|im_end|>` turns,
  `<think>...</think>` reasoning at the start of every assistant turn, `<tool_call>` blocks holding
  `<function=NAME><parameter=ARG>VALUE</parameter></function>`, tool results wrapped in
  `<tool_response>...</tool_response>` inside a user turn). The end-of-turn token `<|im_end|>` is the
  `eos_token` (generation stops there, as in the real model); `</s>` ends each pretraining document in
  packed streams; `<pad>`/`<s>`/`</s>` take ids 0/1/2, the pad/bos/eos ids of the real `config.json`.
- Control tokens (`<pad>`, `<s>`, `</s>`, `<|im_start|>`, `<|im_end|>`) are *special* (dropped by
  `decode(skip_special_tokens=True)`); the markup tokens (`<think>`, `</think>`, `<tool_call>`,
  `</tool_call>`, `<tool_response>`, `</tool_response>`) are single added tokens but not special, so
  decoded text keeps them and reasoning / tool-call parsers can find them (Qwen3-style tokenizers do the same).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nemotron3.train.corpus import iter_documents

PAD = "<pad>"
BOS = "<s>"
DOC_END = "</s>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"

CONTROL_TOKENS: tuple[str, ...] = (PAD, BOS, DOC_END, IM_START, IM_END)
MARKUP_TOKENS: tuple[str, ...] = (
    THINK_START, THINK_END, TOOL_CALL_START, TOOL_CALL_END, TOOL_RESPONSE_START, TOOL_RESPONSE_END,
)  # fmt: skip
SPECIAL_TOKENS: tuple[str, ...] = CONTROL_TOKENS + MARKUP_TOKENS
"""All added tokens, in id order: ids 0..10 in every tokenizer this module trains."""

PAD_ID, BOS_ID, DOC_END_ID, IM_START_ID, IM_END_ID = range(5)
EOS_TOKEN = IM_END
"""tokenizer_config.json's eos_token: the end-of-turn token the real Nemotron 3 chat models stop on."""

DEFAULT_MODEL_MAX_LENGTH = 4096

# The Nemotron 3 chat format, written for nemotron3 from the conventions of the released template:
# a system turn always opens the prompt (empty if none given) and lists the tools; every assistant turn
# starts with its reasoning span (`<think></think>` when empty); reasoning of assistant turns before the
# last user turn is dropped unless truncate_history_thinking=false; the generation prompt opens `<think>\n`
# (or an empty `<think></think>` with enable_thinking=false). Tool-call arguments must be mappings.
CHAT_TEMPLATE = r"""
{%- set enable_thinking = enable_thinking if enable_thinking is defined else true -%}
{%- set truncate_history_thinking = truncate_history_thinking if truncate_history_thinking is defined else true -%}
{%- if messages and messages[0].role == 'system' -%}
  {%- set system_message = messages[0].content | string -%}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set system_message = '' -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in loop_messages -%}
  {%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{{- '<|im_start|>system\n' + system_message -}}
{%- if tools -%}
  {%- if system_message -%}{{- '\n\n' -}}{%- endif -%}
  {{- '# Tools\n\nYou have access to the following functions:\n\n<tools>' -}}
  {%- for tool in tools -%}
    {%- set fn = tool.function if tool.function is defined else tool -%}
    {{- '\n<function>\n<name>' + fn.name + '</name>' -}}
    {%- if fn.description is defined -%}{{- '\n<description>' + fn.description | trim + '</description>' -}}{%- endif -%}
    {{- '\n<parameters>' -}}
    {%- if fn.parameters is defined and fn.parameters.properties is defined -%}
      {%- for pname, pspec in fn.parameters.properties | items -%}
        {{- '\n<parameter>\n<name>' + pname + '</name>' -}}
        {%- if pspec.type is defined -%}{{- '\n<type>' + pspec.type | string + '</type>' -}}{%- endif -%}
        {%- if pspec.description is defined -%}{{- '\n<description>' + pspec.description | trim + '</description>' -}}{%- endif -%}
        {{- '\n</parameter>' -}}
      {%- endfor -%}
      {%- if fn.parameters.required is defined -%}{{- '\n<required>' + fn.parameters.required | tojson + '</required>' -}}{%- endif -%}
    {%- endif -%}
    {{- '\n</parameters>\n</function>' -}}
  {%- endfor -%}
  {{- '\n</tools>\n\nTo call a function, reply in exactly this form:\n<tool_call>\n<function=NAME>\n<parameter=ARGUMENT>\nVALUE\n</parameter>\n</function>\n</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- for m in loop_messages -%}
  {%- if m.role == 'assistant' -%}
    {%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' -%}
    {%- set content = m.content if m.content is string else '' -%}
    {%- if truncate_history_thinking and loop.index0 < ns.last_user -%}{%- set reasoning = '' -%}{%- endif -%}
    {%- if reasoning | trim -%}
      {%- set text = '<think>\n' + reasoning + '\n</think>\n' + content -%}
    {%- else -%}
      {%- set text = '<think></think>' + content -%}
    {%- endif -%}
    {{- '<|im_start|>assistant\n' + text | trim -}}
    {%- if m.tool_calls -%}
      {{- '\n' -}}
      {%- for call in m.tool_calls -%}
        {%- set fn = call.function if call.function is defined else call -%}
        {{- '<tool_call>\n<function=' + fn.name + '>\n' -}}
        {%- for aname, avalue in fn.arguments | items -%}
          {{- '<parameter=' + aname + '>\n' -}}
          {%- if avalue is mapping or (avalue is sequence and avalue is not string) -%}{{- avalue | tojson -}}{%- else -%}{{- avalue | string -}}{%- endif -%}
          {{- '\n</parameter>\n' -}}
        {%- endfor -%}
        {{- '</function>\n</tool_call>\n' -}}
      {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
  {%- elif m.role == 'tool' -%}
    {%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user\n' -}}{%- endif -%}
    {{- '<tool_response>\n' + m.content | string + '\n</tool_response>\n' -}}
    {%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
  {%- else -%}
    {{- '<|im_start|>' + m.role + '\n' + m.content | string + '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' + ('<think>\n' if enable_thinking else '<think></think>') -}}
{%- endif -%}
""".strip()


def train_tokenizer(
    files: Sequence[str | Path],
    vocab_size: int,
    out_dir: str | Path,
    *,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    min_frequency: int = 2,
) -> Path:
    """Train byte-level BPE on the documents of `files` and write the tokenizer directory `out_dir`.

    `files` are corpus text files (documents separated by form feeds, see `nemotron3.train.corpus`; a file
    without one is a single document). `vocab_size` counts everything: the 11 added tokens, the 256 byte
    symbols and the learned merges. The result is deterministic for a given input. Returns `out_dir`.
    """
    paths = [Path(f) for f in files]
    _check_inputs(paths, vocab_size)
    tokenizer = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_documents(paths), trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(_with_markup_not_special(tokenizer.to_str(pretty=True)), encoding="utf-8")
    config = tokenizer_config(model_max_length)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")
    return out


def tokenizer_config(model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> dict:
    """The tokenizer_config.json written next to tokenizer.json (special tokens, length, chat template)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD,
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def render_chat(
    messages: Sequence[dict],
    *,
    tools: Sequence[dict] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool = True,
    truncate_history_thinking: bool = True,
) -> str:
    """Render `messages` with CHAT_TEMPLATE exactly as transformers' `apply_chat_template(tokenize=False)`.

    Messages are OpenAI-style dicts (`role`, `content`, optional `reasoning_content` and `tool_calls` whose
    `function.arguments` is a mapping); `tools` are OpenAI function schemas.
    """
    return _compiled_template().render(
        messages=list(messages),
        tools=list(tools) if tools else None,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
        truncate_history_thinking=truncate_history_thinking,
    )


def _check_inputs(paths: list[Path], vocab_size: int) -> None:
    """Fail early, naming the problem: no files, a missing file, or a vocabulary too small for the bytes."""
    if not paths:
        raise ValueError("train_tokenizer needs at least one text file")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer training files not found: {missing}")
    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise ValueError(f"vocab_size={vocab_size} is below {floor} (256 byte symbols + {len(SPECIAL_TOKENS)} added)")


def _new_tokenizer() -> Tokenizer:
    """An empty byte-level BPE: individual digits, then the GPT-2 byte-level split; ByteLevel decoder."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _documents(paths: Iterable[Path]) -> Iterator[str]:
    """Every document of every file, in order (form-feed separators never reach the trainer)."""
    for path in paths:
        yield from iter_documents(path)


def _with_markup_not_special(tokenizer_json: str) -> str:
    """Mark the reasoning/tool markup tokens non-special (the trainer adds every token as special)."""
    data = json.loads(tokenizer_json)
    for entry in data["added_tokens"]:
        if entry["content"] in MARKUP_TOKENS:
            entry["special"] = False
    return json.dumps(data, indent=2, ensure_ascii=False)


@functools.cache
def _compiled_template():
    """CHAT_TEMPLATE compiled once, in a sandboxed Jinja environment set up like transformers' renderer."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda value: json.dumps(value, ensure_ascii=False)
    return env.from_string(CHAT_TEMPLATE)
