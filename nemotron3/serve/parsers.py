"""Output parsers: reasoning_content vs content, and tool calls into OpenAI `tool_calls`.

Reasoning: the text before `</think>` is reasoning when the prompt opened the span (the chat template's
generation prompt ends with `<think>`); a `<think>` the model writes at the start opens one too.
Tool calls: the Nemotron 3 format inside the content,

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    VALUE
    </parameter>
    </function>
    </tool_call>

(or a JSON body `{"name": ..., "arguments": {...}}`). Parameter values are text; they become JSON values
following the tool's parameter schema (integer / number / boolean / object / array / null are parsed,
strings stay strings), and the arguments are returned as a JSON *string*, as the OpenAI API does.

Each parser has a one-shot form (`parse_*`) and an incremental one (`*StreamParser.feed(delta)` →
pieces, `.finish()` → what was held back) that holds back text that may be the start of a marker.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from nemotron3.engine.reasoning import THINK_END, THINK_START, split_reasoning
from nemotron3.train.tasks import parse_tool_calls as _parse_raw_tool_calls

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"

__all__ = [
    "ReasoningStreamParser",
    "ToolCallStreamParser",
    "parse_reasoning",
    "parse_tool_calls",
    "split_reasoning",
]


def parse_reasoning(text: str, in_reasoning: bool = True) -> tuple[str | None, str]:
    """(reasoning_content or None, content) of a finished output."""
    reasoning, content = split_reasoning(text, in_reasoning)
    return (reasoning or None), content


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (to hold back)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ReasoningStreamParser:
    """Split streamed text into (reasoning_delta, content_delta) pairs."""

    def __init__(self, in_reasoning: bool = True) -> None:
        self.in_reasoning = in_reasoning
        self._maybe_open = not in_reasoning  # the model may still open a span itself at the very start
        self._buf = ""
        self._content_started = False

    def feed(self, delta: str) -> tuple[str, str]:
        self._buf += delta
        reasoning = content = ""
        if self._maybe_open:
            stripped = self._buf.lstrip()
            if THINK_START.startswith(stripped) and len(stripped) < len(THINK_START):
                return "", ""  # could still become <think>
            self._maybe_open = False
            if stripped.startswith(THINK_START):
                self._buf, self.in_reasoning = stripped[len(THINK_START) :], True
        if self.in_reasoning:
            if THINK_END in self._buf:
                reasoning, self._buf = self._buf.split(THINK_END, 1)
                self.in_reasoning = False
            else:
                hold = _held_prefix(self._buf, THINK_END)
                reasoning, self._buf = self._buf[: len(self._buf) - hold], self._buf[len(self._buf) - hold :]
                return reasoning, ""
        content, self._buf = self._buf, ""
        if not self._content_started:
            content = content.lstrip()
            self._content_started = bool(content)
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        buf, self._buf = self._buf, ""
        if self.in_reasoning or (self._maybe_open and not buf.strip()):
            return buf, ""
        return "", buf if self._content_started else buf.lstrip()


# ------------------------------------------------------------------------------------------ tool calls
def _coerce(value: str, spec: dict | None):
    """A parameter's text as the JSON value its schema asks for (strings stay text)."""
    types = (spec or {}).get("type")
    types = types if isinstance(types, list) else [types]
    if types == [None] and spec and ("properties" in spec or "items" in spec):
        types = ["object"]
    if "string" in types:
        return value
    text = value.strip()
    if any(t in ("integer", "number", "boolean", "object", "array", "null") for t in types) or types == [None]:
        try:
            return json.loads(text)
        except ValueError:
            if "boolean" in types and text.lower() in ("true", "false"):
                return text.lower() == "true"
    return value


def _tool_params(tools: list[dict] | None) -> dict[str, dict]:
    out = {}
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out[fn["name"]] = (fn.get("parameters") or {}).get("properties") or {}
    return out


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _to_openai(call: dict, params: dict[str, dict], index: int) -> dict:
    spec = params.get(call["name"], {})
    args = {k: (_coerce(v, spec.get(k)) if isinstance(v, str) else v) for k, v in call["arguments"].items()}
    return {
        "index": index,
        "id": new_call_id(),
        "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(args, ensure_ascii=False)},
    }


def parse_tool_calls(content: str, tools: list[dict] | None = None) -> tuple[str | None, list[dict]]:
    """(content without the tool-call blocks or None, OpenAI tool_calls with JSON-string arguments)."""
    if TOOL_CALL_START not in content:
        return content, []
    params = _tool_params(tools)
    calls = [_to_openai(c, params, i) for i, c in enumerate(_parse_raw_tool_calls(content))]
    if not calls:
        return content, []
    text = content.split(TOOL_CALL_START, 1)[0].strip()
    return (text or None), calls


@dataclass
class ToolCallStreamParser:
    """Streamed content → (content_delta, [complete tool_call deltas]). A call is sent whole once closed."""

    tools: list[dict] | None = None
    _buf: str = ""
    _in_call: bool = False
    _count: int = 0
    _params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._params = _tool_params(self.tools)

    @property
    def num_calls(self) -> int:
        return self._count

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        self._buf += delta
        content, calls = "", []
        while True:
            if not self._in_call:
                i = self._buf.find(TOOL_CALL_START)
                if i < 0:
                    hold = _held_prefix(self._buf, TOOL_CALL_START)
                    content += self._buf[: len(self._buf) - hold]
                    self._buf = self._buf[len(self._buf) - hold :]
                    break
                content += self._buf[:i]
                self._buf, self._in_call = self._buf[i:], True
            j = self._buf.find(TOOL_CALL_END)
            if j < 0:
                break
            block, self._buf = self._buf[: j + len(TOOL_CALL_END)], self._buf[j + len(TOOL_CALL_END) :]
            self._in_call = False
            calls.extend(self._parse(block))
        if self._count and content.strip() == "":
            content = ""  # whitespace between calls is not content
        return content, calls

    def finish(self) -> tuple[str, list[dict]]:
        buf, self._buf = self._buf, ""
        if self._in_call:
            calls = self._parse(buf)
            return ("", calls) if calls else (buf, [])
        return buf, []

    def _parse(self, block: str) -> list[dict]:
        out = []
        for c in _parse_raw_tool_calls(block):
            out.append(_to_openai(c, self._params, self._count))
            self._count += 1
        return out


# ------------------------------------------------------------------------------------------ tool schemas
def validate_tools(tools: list[dict] | None) -> None:
    """ValueError naming the problem when a tool definition is not a valid OpenAI function tool."""
    import re

    for i, tool in enumerate(tools or []):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ValueError(f"{where}: only tools of type 'function' are supported")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"{where}.function must be an object")  # noqa: TRY004 - answered as a 400
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise ValueError(f"{where}.function.name must match ^[A-Za-z0-9_.-]{{1,64}}$, got {name!r}")
        params = fn.get("parameters")
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ValueError(f"{where}.function.parameters must be a JSON schema object")  # noqa: TRY004
        if params.get("type", "object") != "object":
            raise ValueError(f"{where}.function.parameters must be a schema of type 'object'")
        try:
            import jsonschema

            jsonschema.Draft202012Validator.check_schema(params)
        except ImportError:  # pragma: no cover
            pass
        except jsonschema.SchemaError as e:
            raise ValueError(f"{where}.function.parameters is not a valid JSON schema: {e.message}") from None
