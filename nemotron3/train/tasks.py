"""Synthetic verifiable tasks: seeded generators, chat/plain renderings and exact-match verifiers.

Four domains, each a generator taking a `random.Random` (so a seed fixes every instance) and a verifier
`verify(instance, model_output_text) -> bool`:
- "arithmetic": multi-digit addition / subtraction / multiplication with a worked, column-by-column
  reasoning trace (carries, borrows, partial products) for the `<think>` span;
- "retrieval": N random `key: value` lines (length set by pair count, characters or tokens; the needle's
  depth set explicitly) and a question about one key, RULER-style;
- "sorting": sort ascending / descending or reverse a list of integers;
- "tool_use": a question needing a tool (a calculator, or a lookup in a table only the tool can see); the
  assistant calls it in the Nemotron 3 form `<tool_call><function=NAME><parameter=ARG>VALUE</parameter>
  </function></tool_call>`, a `<tool_response>` follows, then the answer.

Instances are `TaskInstance`s (prompt, reasoning, answer, domain, metadata). `as_messages()` gives
OpenAI-style chat messages (assistant `reasoning_content`, `tool_calls` with mapping arguments, as chat
templates take them), `render_conversation()` the chat-template text for SFT, `render_plain()` a plain-text
form for pretraining mixes and `gold_output()` an assistant turn exactly as the model should generate it.
Verifiers read the final answer after the last `</think>` (an unclosed `<think>` means no answer) and
compare exactly: the last integer for arithmetic/retrieval, the last comma-separated integer run for
sorting, and the parsed call (XML or JSON body) or the final integer for tool use.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nemotron3.train.tokenizer import THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START, render_chat

DOMAINS = ("arithmetic", "retrieval", "sorting", "tool_use")


@dataclass(frozen=True)
class TaskInstance:
    """One task: the user `prompt`, the gold `reasoning` (may be empty) and final `answer`, and details.

    `metadata` holds what the verifier and renderers need (operands, key, list, tool call, ...); for tool
    use it holds `tools` (OpenAI function schemas), `tool_call` ({name, arguments}) and `tool_response`.
    """

    prompt: str
    reasoning: str
    answer: str
    domain: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def tools(self) -> list[dict]:
        """OpenAI function schemas offered to the model (empty outside tool use)."""
        return list(self.metadata.get("tools", []))

    def as_messages(self, system: str | None = None) -> list[dict]:
        """OpenAI-style messages: [system], user, assistant (+ tool call, tool result, final assistant)."""
        messages: list[dict] = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": self.prompt})
        call = self.metadata.get("tool_call")
        if call is None:
            messages.append({"role": "assistant", "content": self.answer, "reasoning_content": self.reasoning})
            return messages
        tool_call = {"id": "call_0", "type": "function",
                     "function": {"name": call["name"], "arguments": dict(call["arguments"])}}  # fmt: skip
        messages += [
            {"role": "assistant", "content": "", "reasoning_content": self.reasoning, "tool_calls": [tool_call]},
            {"role": "tool", "tool_call_id": "call_0", "name": call["name"], "content": self.metadata["tool_response"]},
            {"role": "assistant", "content": self.answer, "reasoning_content": ""},
        ]
        return messages


# ---- rendering ------------------------------------------------------------------------------------------
def render_conversation(instance: TaskInstance, *, system: str | None = None) -> str:
    """The whole conversation in the chat template (reasoning kept), as SFT text."""
    return render_chat(instance.as_messages(system), tools=instance.tools or None, truncate_history_thinking=False)


def gold_output(instance: TaskInstance, turn: int = -1) -> str:
    """Assistant turn `turn` (default: the last) exactly as rendered: `<think>...</think>` then content/calls."""
    assistants = [m for m in instance.as_messages() if m["role"] == "assistant"]
    rendered = render_chat([assistants[turn]])
    body = rendered.split("<|im_start|>assistant\n", 1)[1]
    return body[: body.rindex("<|im_end|>")]


def render_plain(instance: TaskInstance) -> str:
    """Plain text for pretraining mixes: question, reasoning, (tool call and result), answer."""
    lines = [f"Question: {instance.prompt}"]
    if instance.reasoning:
        lines.append(f"Reasoning: {instance.reasoning}")
    call = instance.metadata.get("tool_call")
    if call is not None:
        args = ", ".join(f"{k}={json.dumps(v)}" for k, v in call["arguments"].items())
        lines += [f"Tool call: {call['name']}({args})", f"Tool result: {instance.metadata['tool_response']}"]
    lines.append(f"Answer: {instance.answer}")
    return "\n".join(lines) + "\n"


# ---- arithmetic -----------------------------------------------------------------------------------------
def arithmetic_task(
    rng: random.Random, *, digits: int | tuple[int, int] = (1, 4), operations: Sequence[str] = ("add", "sub", "mul")
) -> TaskInstance:
    """`a op b` with each operand's digit count drawn from `digits` (an int or an inclusive range)."""
    op = rng.choice(list(operations))
    a, b = _operand(rng, digits), _operand(rng, digits)
    traces = {"add": _addition_trace, "sub": _subtraction_trace, "mul": _multiplication_trace}
    if op not in traces:
        raise ValueError(f"unknown arithmetic operation {op!r}; choose from {sorted(traces)}")
    reasoning, result = traces[op](a, b)
    symbol = {"add": "+", "sub": "-", "mul": "*"}[op]
    return TaskInstance(
        prompt=f"What is {a} {symbol} {b}?", reasoning=reasoning, answer=str(result), domain="arithmetic",
        metadata={"a": a, "b": b, "op": op, "result": result},
    )  # fmt: skip


def _operand(rng: random.Random, digits: int | tuple[int, int]) -> int:
    """A random number with a digit count drawn from `digits` (1-digit numbers include 0)."""
    lo, hi = (digits, digits) if isinstance(digits, int) else digits
    if not 1 <= lo <= hi:
        raise ValueError(f"digits must be >= 1 and lo <= hi, got {digits}")
    n = rng.randint(lo, hi)
    return rng.randint(0 if n == 1 else 10 ** (n - 1), 10**n - 1)


def _digits_lsb(x: int, width: int) -> list[int]:
    """The decimal digits of x, least significant first, zero-padded to `width`."""
    return [int(c) for c in reversed(str(x).zfill(width))]


def _read_back(written: list[int]) -> tuple[str, int]:
    """The written column digits read most-significant first, and their value."""
    text = "".join(str(d) for d in reversed(written))
    return text, int(text)


def _addition_trace(a: int, b: int) -> tuple[str, int]:
    """Column addition with carries; returns (trace, a + b)."""
    width = max(len(str(a)), len(str(b)))
    da, db = _digits_lsb(a, width), _digits_lsb(b, width)
    lines = [f"Add {a} + {b} one column at a time, from the ones digit leftwards."]
    written, carry = [], 0
    for i in range(width):
        s = da[i] + db[i] + carry
        lines.append(f"column {i + 1}: {da[i]} + {db[i]} + carry {carry} = {s}, write {s % 10}, carry {s // 10}")
        written.append(s % 10)
        carry = s // 10
    if carry:
        lines.append(f"The final carry {carry} becomes the leading digit.")
        written.append(carry)
    text, value = _read_back(written)
    lines += [f"Reading the written digits from the last column to the first: {text}.", f"So {a} + {b} = {value}."]
    return "\n".join(lines), value


def _subtraction_trace(a: int, b: int) -> tuple[str, int]:
    """Column subtraction with borrows (larger minus smaller, sign fixed at the end); returns (trace, a - b)."""
    big, small = max(a, b), min(a, b)
    lines = [f"Subtract {a} - {b} one column at a time, from the ones digit leftwards."]
    if a < b:
        lines.append(f"Since {a} < {b}, compute {big} - {small} and make the result negative.")
    width = len(str(big))
    dg, ds = _digits_lsb(big, width), _digits_lsb(small, width)
    written, borrow = [], 0
    for i in range(width):
        v = dg[i] - ds[i] - borrow
        step = f"column {i + 1}: {dg[i]} - {ds[i]} - borrow {borrow} = {v}"
        if v < 0:
            step += f", negative so add 10: {v + 10}"
        written.append(v % 10)
        borrow = 1 if v < 0 else 0
        lines.append(f"{step}, write {v % 10}, borrow {borrow}")
    text, value = _read_back(written)
    lines.append(f"Reading the written digits from the last column to the first: {text}"
                 + (f", which is {value}." if text != str(value) else "."))  # fmt: skip
    result = a - b
    lines.append(f"So {a} - {b} = {result}.")
    return "\n".join(lines), result


def _multiplication_trace(a: int, b: int) -> tuple[str, int]:
    """Long multiplication: one partial product per digit of b, then a running sum; returns (trace, a * b)."""
    lines = [f"Multiply {a} * {b} by splitting {b} into its digits."]
    partials = []
    for j, d in enumerate(_digits_lsb(b, len(str(b)))):
        m = d * 10**j
        partials.append(a * m)
        lines.append(f"{a} * {m} = {a * m}")
    if len(partials) == 1:
        lines.append("There is only one partial product.")
    total = partials[0]
    for k, p in enumerate(partials[1:]):
        prefix = "Add the partial products: " if k == 0 else ""
        lines.append(f"{prefix}{total} + {p} = {total + p}")
        total += p
    lines.append(f"So {a} * {b} = {total}.")
    return "\n".join(lines), total


# ---- retrieval ------------------------------------------------------------------------------------------
_ADJECTIVES = (
    "amber", "azure", "bold", "brisk", "calm", "crimson", "dusky", "eager", "fern", "frosty", "gentle", "gilded",
    "hollow", "ivory", "jade", "keen", "lunar", "misty", "noble", "olive", "pale", "quiet", "rapid", "rusty",
    "silver", "sleek", "solar", "stormy", "tawny", "umber", "velvet", "vivid", "wild", "woven",
)  # fmt: skip
_NOUNS = (
    "anchor", "badger", "beacon", "cedar", "comet", "falcon", "garnet", "harbor", "heron", "island", "juniper",
    "kettle", "lantern", "maple", "meadow", "nectar", "orchid", "otter", "pebble", "quarry", "raven", "saddle",
    "spruce", "thistle", "tundra", "valley", "walrus", "willow", "yarrow", "zephyr",
)  # fmt: skip


def retrieval_task(
    rng: random.Random,
    *,
    num_pairs: int | None = None,
    context_chars: int | None = None,
    context_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
    depth: float | None = None,
) -> TaskInstance:
    """Key-value retrieval: a list of `key: value` lines and a question about the key at `depth`.

    Length: exactly `num_pairs` lines, or lines added until the list reaches `context_chars` characters or
    `context_tokens` tokens (counted with `count_tokens`, line by line; lines end in a newline so byte-level
    BPE tokens never span two lines). Default 16 pairs. `depth` in [0, 1] places the needle (0: first
    line, 1: last); random when None. Values are 6-digit numbers, keys unique `word-word-NN` triples.
    """
    targets = [x is not None for x in (num_pairs, context_chars, context_tokens)]
    if sum(targets) > 1:
        raise ValueError("give at most one of num_pairs, context_chars, context_tokens")
    if context_tokens is not None and count_tokens is None:
        raise ValueError("context_tokens needs count_tokens (a function text -> number of tokens)")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if num_pairs is not None and num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    if num_pairs is None and context_chars is None and context_tokens is None:
        num_pairs = 16
    counter = count_tokens if context_tokens is not None else None
    limit = context_chars if context_chars is not None else context_tokens
    header = "Below is a list of keys with their values.\n"
    lines: list[str] = []
    keys: set[str] = set()
    size = _line_size(header, counter)
    while len(lines) < (num_pairs or 1) or (num_pairs is None and size < limit):
        line = f"{_unique_key(rng, keys)}: {rng.randint(100000, 999999)}\n"
        lines.append(line)
        size += _line_size(line, counter)
    depth = rng.random() if depth is None else depth
    needle = round(depth * (len(lines) - 1))
    key, value = lines[needle].rstrip("\n").split(": ")
    context = header + "".join(lines)
    prompt = f"{context}\nWhat is the value of {key}? Answer with the number only."
    reasoning = (f"I need the value of {key}. Scanning the list, line {needle + 1} of {len(lines)} reads "
                 f"\"{key}: {value}\". So the value is {value}.")  # fmt: skip
    metadata = {"key": key, "value": int(value), "num_pairs": len(lines), "needle_index": needle, "depth": depth,
                "needle_offset": len(header) + sum(len(x) for x in lines[:needle]), "context_chars": len(context)}  # fmt: skip
    if count_tokens is not None:
        metadata["context_tokens"] = count_tokens(context)
    return TaskInstance(prompt=prompt, reasoning=reasoning, answer=value, domain="retrieval", metadata=metadata)


def _line_size(line: str, count_tokens: Callable[[str], int] | None) -> int:
    """Size of one line in characters, or in tokens when a counter is given."""
    return count_tokens(line) if count_tokens is not None else len(line)


def _unique_key(rng: random.Random, taken: set[str]) -> str:
    """A fresh `adjective-noun-NN` key (91,800 combinations; fails loudly when it cannot find a new one)."""
    for _ in range(1000):
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}-{rng.randint(10, 99)}"
        if key not in taken:
            taken.add(key)
            return key
    raise ValueError(f"could not draw a new unique key after 1000 tries ({len(taken)} keys taken)")


# ---- sorting --------------------------------------------------------------------------------------------
_SORT_PROMPTS = {
    "sort_ascending": "Sort these numbers in ascending order: {items}",
    "sort_descending": "Sort these numbers in descending order: {items}",
    "reverse": "Reverse the order of this list: {items}",
}


def sorting_task(
    rng: random.Random,
    *,
    length: int | tuple[int, int] = (3, 10),
    max_value: int = 99,
    operations: Sequence[str] = ("sort_ascending", "sort_descending", "reverse"),
) -> TaskInstance:
    """Sort (ascending/descending) or reverse a list of integers in [0, max_value]; answer `a, b, c`."""
    op = rng.choice(list(operations))
    if op not in _SORT_PROMPTS:
        raise ValueError(f"unknown list operation {op!r}; choose from {sorted(_SORT_PROMPTS)}")
    lo, hi = (length, length) if isinstance(length, int) else length
    if not 1 <= lo <= hi:
        raise ValueError(f"length must be >= 1 and lo <= hi, got {length}")
    items = [rng.randint(0, max_value) for _ in range(rng.randint(lo, hi))]
    result = sorted(items, reverse=op == "sort_descending") if op != "reverse" else items[::-1]
    reasoning = _reverse_trace(items) if op == "reverse" else _selection_trace(items, op == "sort_descending")
    return TaskInstance(
        prompt=_SORT_PROMPTS[op].format(items=_join(items)), reasoning=reasoning, answer=_join(result),
        domain="sorting", metadata={"items": items, "op": op, "result": result},
    )  # fmt: skip


def _join(items: Sequence[int]) -> str:
    return ", ".join(str(x) for x in items)


def _selection_trace(items: list[int], descending: bool) -> str:
    """Selection sort, one line per pick: the chosen extreme and what remains."""
    remaining, picked, lines = list(items), [], []
    word = "largest" if descending else "smallest"
    while remaining:
        x = max(remaining) if descending else min(remaining)
        remaining.remove(x)
        picked.append(x)
        rest = _join(remaining) if remaining else "nothing"
        lines.append(f"The {word} of the remaining numbers is {x}; left: {rest}.")
    lines.append(f"In order: {_join(picked)}.")
    return "\n".join(lines)


def _reverse_trace(items: list[int]) -> str:
    """Reading the list from its last position to its first."""
    steps = [f"position {i + 1}: {items[i]}" for i in range(len(items) - 1, -1, -1)]
    return "Read the list from the end: " + "; ".join(steps) + f".\nReversed: {_join(items[::-1])}."


# ---- tool use -------------------------------------------------------------------------------------------
CALCULATOR_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression over integers with + - * and parentheses.",
        "parameters": {"type": "object", "required": ["expression"],
                       "properties": {"expression": {"type": "string", "description": "e.g. (12 + 3) * 4"}}},
    },
}  # fmt: skip
LOOKUP_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Return the value stored under a key in one of the tables: inventory, elevation.",
        "parameters": {"type": "object", "required": ["table", "key"], "properties": {
            "table": {"type": "string", "description": "inventory (units in stock) or elevation (metres)"},
            "key": {"type": "string", "description": "the item or town name"}}},
    },
}  # fmt: skip
_TOWN_PARTS = (["Ash", "Bram", "Cold", "Dun", "Elm", "Fen", "Glen", "Hart", "Kirk", "Lark", "Mill", "Oak", "Pen", "Rook", "Stan", "Thorn", "Wick"],
               ["bury", "ford", "gate", "ham", "holm", "ley", "mere", "moor", "stead", "ton", "wick", "worth"])  # fmt: skip


def tool_task(
    rng: random.Random, *, tools: Sequence[str] = ("calculator", "lookup"), digits: tuple[int, int] = (2, 4)
) -> TaskInstance:
    """A question that needs a tool: calculator arithmetic, or a lookup in a table only the tool can see."""
    kind = rng.choice(list(tools))
    if kind == "calculator":
        return _calculator_task(rng, digits)
    if kind == "lookup":
        return _lookup_task(rng)
    raise ValueError(f"unknown tool {kind!r}; choose from ['calculator', 'lookup']")


def _calculator_task(rng: random.Random, digits: tuple[int, int]) -> TaskInstance:
    """Two or three operands with + - * (optionally parenthesised); the tool returns {"result": value}."""
    nums = [_operand(rng, digits) for _ in range(rng.choice((2, 3)))]
    ops = [rng.choice("+-*") for _ in nums[1:]]
    expression = f"{nums[0]} {ops[0]} {nums[1]}"
    if len(nums) == 3:
        expression = f"({expression}) {ops[1]} {nums[2]}" if rng.random() < 0.5 else f"{expression} {ops[1]} {nums[2]}"
    value = _evaluate(expression)
    reasoning = f"The user wants the value of {expression}. Exact multi-digit arithmetic is a job for the calculator."
    return _tool_instance(
        prompt=f"Please compute {expression}.", reasoning=reasoning, answer=str(value),
        call={"name": "calculator", "arguments": {"expression": expression}}, response={"result": value},
    )  # fmt: skip


def _lookup_task(rng: random.Random) -> TaskInstance:
    """A random table (inventory of items, or town elevations) held by the tool; ask for one row."""
    table = rng.choice(("inventory", "elevation"))
    keys: set[str] = set()
    n_rows = rng.randint(4, 10)
    while len(keys) < n_rows:
        keys.add(f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}" if table == "inventory"
                 else rng.choice(_TOWN_PARTS[0]) + rng.choice(_TOWN_PARTS[1]))  # fmt: skip
    rows = {k: rng.randint(0, 999) if table == "inventory" else rng.randint(2, 2500) for k in sorted(keys)}
    key = rng.choice(sorted(rows))
    question = (f"How many units of {key} are in stock?" if table == "inventory"
                else f"What is the elevation of {key} in metres?")  # fmt: skip
    reasoning = f"The {table} table is not in the conversation; the lookup tool can read the row for {key}."
    return _tool_instance(
        prompt=question, reasoning=reasoning, answer=str(rows[key]),
        call={"name": "lookup", "arguments": {"table": table, "key": key}},
        response={"table": table, "key": key, "value": rows[key]}, extra={"table": rows},
    )  # fmt: skip


def _tool_instance(*, prompt: str, reasoning: str, answer: str, call: dict, response: dict,
                   extra: dict | None = None) -> TaskInstance:  # fmt: skip
    """A tool-use TaskInstance with both tools offered and the tool's JSON response."""
    metadata = {"tools": [CALCULATOR_TOOL, LOOKUP_TOOL], "tool_call": call, "tool_response": json.dumps(response)}
    return TaskInstance(prompt, reasoning, answer, "tool_use", {**metadata, **(extra or {})})


def _evaluate(expression: str) -> int:
    """Evaluate our generated integer expressions (+ - * and parentheses) without eval()."""
    tokens = re.findall(r"\d+|[()+\-*]", expression)
    pos = 0

    def expr() -> int:
        nonlocal pos
        value = term()
        while pos < len(tokens) and tokens[pos] in "+-":
            op, pos = tokens[pos], pos + 1
            value = value + term() if op == "+" else value - term()
        return value

    def term() -> int:
        nonlocal pos
        value = atom()
        while pos < len(tokens) and tokens[pos] == "*":
            pos += 1
            value *= atom()
        return value

    def atom() -> int:
        nonlocal pos
        token, pos = tokens[pos], pos + 1
        if token == "(":
            value = expr()
            pos += 1  # the closing parenthesis
            return value
        return int(token)

    return expr()


# ---- verification ---------------------------------------------------------------------------------------
_INTEGER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?!\d)|-?\d+")
_INTEGER_RUN = re.compile(r"-?\d+(?:\s*,\s*-?\d+)*")


def final_answer(text: str) -> str | None:
    """The text after the last `</think>`; the whole text when there is no reasoning span; None if unclosed."""
    if THINK_END in text:
        return text.rsplit(THINK_END, 1)[1]
    return None if THINK_START in text else text


def last_integer(text: str) -> int | None:
    """The last integer in `text` (thousands separators allowed), or None."""
    matches = _INTEGER.findall(text)
    return int(matches[-1].replace(",", "")) if matches else None


def parse_tool_calls(text: str) -> list[dict]:
    """Every `<tool_call>` in `text` as {name, arguments}: the Nemotron 3 XML body or a JSON object body.

    XML: `<function=NAME>` with `<parameter=ARG>VALUE</parameter>` children (values are strings).
    JSON: `{"name": ..., "arguments": {...} or a JSON string}`. Unparseable bodies are skipped.
    """
    calls = []
    for body in re.findall(
        re.escape(TOOL_CALL_START) + r"(.*?)(?:" + re.escape(TOOL_CALL_END) + r"|\Z)", text, re.DOTALL
    ):
        call = _parse_xml_call(body) or _parse_json_call(body)
        if call is not None:
            calls.append(call)
    return calls


def _parse_xml_call(body: str) -> dict | None:
    """`<function=NAME>...<parameter=ARG>\\nVALUE\\n</parameter>...</function>` -> {name, arguments}."""
    match = re.search(r"<function=([^>\n]+)>(.*?)(?:</function>|\Z)", body, re.DOTALL)
    if match is None:
        return None
    params = re.findall(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", match.group(2), re.DOTALL)
    return {"name": match.group(1).strip(), "arguments": {k.strip(): v for k, v in params}}


def _parse_json_call(body: str) -> dict | None:
    """`{"name": ..., "arguments": ...}` -> {name, arguments} (arguments may be a JSON-encoded string)."""
    try:
        data = json.loads(body.strip())
        arguments = data.get("arguments", {})
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except (ValueError, AttributeError):
        return None
    if not isinstance(data.get("name"), str) or not isinstance(arguments, dict):
        return None
    return {"name": data["name"], "arguments": arguments}


def verify_arithmetic(instance: TaskInstance, text: str) -> bool:
    """The last integer of the final answer equals the exact result."""
    answer = final_answer(text)
    return answer is not None and last_integer(answer) == int(instance.answer)


def verify_retrieval(instance: TaskInstance, text: str) -> bool:
    """The last integer of the final answer equals the needle's value."""
    answer = final_answer(text)
    return answer is not None and last_integer(answer) == int(instance.answer)


def verify_sorting(instance: TaskInstance, text: str) -> bool:
    """The last comma-separated run of integers in the final answer equals the expected list."""
    answer = final_answer(text)
    if answer is None:
        return False
    runs = _INTEGER_RUN.findall(answer)
    return bool(runs) and [int(x) for x in runs[-1].split(",")] == instance.metadata["result"]


def verify_tool_use(instance: TaskInstance, text: str) -> bool:
    """A tool-call turn: its first call matches name and arguments; otherwise: the final integer answer."""
    answer = final_answer(text)
    if answer is None:
        return False
    if TOOL_CALL_START in answer:
        calls = parse_tool_calls(answer)
        return bool(calls) and _same_call(calls[0], instance.metadata["tool_call"])
    return last_integer(answer) == int(instance.answer)


def _same_call(got: dict, expected: dict) -> bool:
    """Same tool and same argument names and values (compared as stripped strings; expressions ignore spaces)."""
    if got["name"] != expected["name"] or set(got["arguments"]) != set(expected["arguments"]):
        return False
    for name, value in expected["arguments"].items():
        a, b = str(got["arguments"][name]).strip(), str(value).strip()
        if name == "expression":
            a, b = a.replace(" ", ""), b.replace(" ", "")
        if a != b:
            return False
    return True


GENERATORS: dict[str, Callable[..., TaskInstance]] = {
    "arithmetic": arithmetic_task, "retrieval": retrieval_task, "sorting": sorting_task, "tool_use": tool_task,
}  # fmt: skip
VERIFIERS: dict[str, Callable[[TaskInstance, str], bool]] = {
    "arithmetic": verify_arithmetic, "retrieval": verify_retrieval, "sorting": verify_sorting,
    "tool_use": verify_tool_use,
}  # fmt: skip


def generate(domain: str, n: int, seed: int, **options: Any) -> list[TaskInstance]:
    """`n` instances of `domain` from `random.Random(f"{domain}/{seed}")`; `options` go to the generator."""
    if domain not in GENERATORS:
        raise ValueError(f"unknown task domain {domain!r}; choose from {list(DOMAINS)}")
    rng = random.Random(f"{domain}/{seed}")
    return [GENERATORS[domain](rng, **options) for _ in range(n)]


def verify(instance: TaskInstance, model_output_text: str) -> bool:
    """Exact-match check of a model's output for `instance` with its domain's verifier."""
    if instance.domain not in VERIFIERS:
        raise ValueError(f"no verifier for domain {instance.domain!r}")
    return VERIFIERS[instance.domain](instance, model_output_text)
