"""Local demo tools for `nemotron3 chat --tools`: the calculator and lookup tools of the tool-use task.

The schemas are the ones the model is post-trained on (nemotron3/train/tasks.py: CALCULATOR_TOOL,
LOOKUP_TOOL); the calculator uses the same safe integer-expression parser as the task generator, and lookup
reads two small fixed demo tables. `run_tool(call)` answers a JSON string and never raises on bad model
output: an unknown tool, a missing or extra argument or a malformed expression answers {"error": "..."}.
"""

from __future__ import annotations

import json
import re
from typing import Any

from nemotron3.train.tasks import CALCULATOR_TOOL, LOOKUP_TOOL
from nemotron3.train.tasks import _evaluate as evaluate_expression

DEMO_TOOLS: list[dict] = [CALCULATOR_TOOL, LOOKUP_TOOL]

# units in stock (inventory) and metres above sea level (elevation), as the lookup task's tables
TABLES: dict[str, dict[str, int]] = {
    "inventory": {
        "amber lantern": 42, "brass compass": 17, "cedar crate": 305, "copper kettle": 88,
        "crimson scarf": 251, "iron anvil": 6, "linen sack": 590, "oak barrel": 73,
        "silver spoon": 134, "tin whistle": 219, "velvet glove": 47, "woollen blanket": 162,
    },
    "elevation": {
        "Ashford": 112, "Bramley": 348, "Coldmere": 1204, "Dunholm": 57, "Elmstead": 233, "Fenton": 4,
        "Glenmoor": 1877, "Hartwick": 690, "Kirkgate": 415, "Larkham": 96, "Oakley": 781, "Thornbury": 2311,
    },
}  # fmt: skip

_EXPRESSION = re.compile(r"[\d\s()+\-*]+")
_MAX_EXPRESSION = 200


def calculator(expression: str) -> dict:
    """{"result": value} of an integer expression with + - * and parentheses (ValueError when malformed)."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError("expression must be a non-empty string")
    if len(expression) > _MAX_EXPRESSION:
        raise ValueError(f"expression is longer than {_MAX_EXPRESSION} characters")
    if not _EXPRESSION.fullmatch(expression):
        raise ValueError(f"malformed expression {expression!r}: only integers, + - * and parentheses")
    _check_shape(re.findall(r"\d+|[()+\-*]", expression), expression)
    return {"result": evaluate_expression(expression)}


def _check_shape(tokens: list[str], expression: str) -> None:
    """Operands and operators alternate, parentheses balance (the parser itself is lenient about both)."""
    want_operand, depth = True, 0
    for tok in tokens:
        if want_operand and tok == "(":
            depth += 1
        elif want_operand and tok.isdigit():
            want_operand = False
        elif not want_operand and tok == ")" and depth > 0:
            depth -= 1
        elif not want_operand and tok in "+-*":
            want_operand = True
        else:
            raise ValueError(f"malformed expression {expression!r}: unexpected {tok!r}")
    if want_operand or depth:
        raise ValueError(f"malformed expression {expression!r}: incomplete")


def lookup(table: str, key: str) -> dict:
    """{"table", "key", "value"} of one demo-table row, or {"error"} for an unknown table or key."""
    rows = TABLES.get(str(table).strip().lower())
    if rows is None:
        return {"error": f"unknown table {table!r}; tables: {', '.join(TABLES)}"}
    match = {k.lower(): k for k in rows}.get(str(key).strip().lower())
    if match is None:
        return {"error": f"unknown key {key!r} in table {table!r}"}
    return {"table": str(table).strip().lower(), "key": match, "value": rows[match]}


TOOL_FUNCTIONS = {"calculator": calculator, "lookup": lookup}


def run_tool(call: dict) -> str:
    """Execute one tool call ({name, arguments} or OpenAI {function: {...}}, arguments a mapping or JSON
    text) and answer its result as a JSON string; every problem becomes {"error": "..."}."""
    return json.dumps(_run(call), ensure_ascii=False)


def _run(call: Any) -> dict:
    fn = call.get("function", call) if isinstance(call, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if name not in TOOL_FUNCTIONS:
        return {"error": f"unknown tool {name!r}; tools: {', '.join(TOOL_FUNCTIONS)}"}
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return {"error": f"{name}: arguments are not valid JSON"}
    if not isinstance(args, dict):
        return {"error": f"{name}: arguments must be an object"}
    params = next(t["function"]["parameters"] for t in DEMO_TOOLS if t["function"]["name"] == name)
    missing = [p for p in params["required"] if p not in args]
    extra = [a for a in args if a not in params["properties"]]
    if missing or extra:
        parts = ([f"missing argument(s) {', '.join(missing)}"] if missing else []) + (
            [f"unexpected argument(s) {', '.join(extra)}"] if extra else [])  # fmt: skip
        return {"error": f"{name}: " + "; ".join(parts)}
    try:
        return TOOL_FUNCTIONS[name](**{k: (v if isinstance(v, str) else str(v)) for k, v in args.items()})
    except (ValueError, TypeError, IndexError, RecursionError) as e:
        return {"error": f"{name}: {e}"}


def describe_call(call: dict) -> str:
    """`calculator(expression="12 + 5")` for display."""
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return f"{fn.get('name')}({args})"
    if not isinstance(args, dict):
        return f"{fn.get('name')}({args!r})"
    return f"{fn.get('name')}(" + ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in args.items()) + ")"
