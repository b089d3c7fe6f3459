"""Parsers, reasoning modes and the JSON constraint, without a server."""

from __future__ import annotations

import json

import pytest

from nemotron3.engine.reasoning import ReasoningConfig, split_reasoning
from nemotron3.engine.structured import Automaton, compile_schema, json_object_grammar
from nemotron3.serve.parsers import (
    ReasoningStreamParser,
    ToolCallStreamParser,
    parse_reasoning,
    parse_tool_calls,
    validate_tools,
)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "metric": {"type": "boolean"}, "tags": {"type": "array"}}}}}]  # fmt: skip
TEXT = ("I think.\n</think>\nSure.<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n<parameter=tags>\n[\"a\"]\n"
        "</parameter>\n</function>\n</tool_call>")  # fmt: skip


def test_parse_reasoning_and_tool_calls():
    reasoning, content = parse_reasoning(TEXT, in_reasoning=True)
    assert reasoning == "I think."
    content, calls = parse_tool_calls(content, TOOLS)
    assert content == "Sure."
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 3, "metric": True, "tags": ["a"]}
    assert split_reasoning("no span here", in_reasoning=False) == (None, "no span here")
    assert split_reasoning("<think>x</think>y", in_reasoning=False) == ("x", "y")
    assert parse_reasoning("cut off by the budget", True) == ("cut off by the budget", "")


@pytest.mark.parametrize("step", [1, 2, 3, 5, 7])
def test_stream_parsers_match_one_shot(step):
    rp, tp = ReasoningStreamParser(True), ToolCallStreamParser(TOOLS)
    reasoning, content, calls = "", "", []
    for i in range(0, len(TEXT), step):
        r, c = rp.feed(TEXT[i : i + step])
        reasoning += r
        c, k = tp.feed(c)
        content, calls = content + c, calls + k
    r, c = rp.finish()
    reasoning += r
    c, k = tp.feed(c)
    c2, k2 = tp.finish()
    content, calls = content + c + c2, calls + k + k2
    assert reasoning.strip() == "I think."
    assert content == "Sure."
    assert [json.loads(x["function"]["arguments"])["days"] for x in calls] == [3]


def test_validate_tools():
    validate_tools(TOOLS)
    with pytest.raises(ValueError, match="name"):
        validate_tools([{"type": "function", "function": {"name": "bad name!"}}])
    with pytest.raises(ValueError, match="JSON schema"):
        validate_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                                    "properties": 3}}}])  # fmt: skip


def test_reasoning_config():
    assert ReasoningConfig.resolve() == ReasoningConfig(True, None)
    assert ReasoningConfig.resolve(reasoning_effort="none").enabled is False
    assert ReasoningConfig.resolve(reasoning_effort="low").budget == 256
    assert ReasoningConfig.resolve(reasoning_effort="low", budget=7).budget == 7
    assert ReasoningConfig.resolve(enable_thinking=False, budget=7).budget is None
    with pytest.raises(ValueError):
        ReasoningConfig.resolve(reasoning_effort="extreme")
    with pytest.raises(ValueError):
        ReasoningConfig.resolve(budget=-1)


def _accepts(grammar, text: str) -> bool:
    a = Automaton(grammar)
    states = a.feed(a.initial(), text)
    return bool(states) and a.can_finish(states)


def test_json_automaton():
    g = json_object_grammar()
    assert _accepts(g, '{"a":[1,-2.5e3,{"b":null}],"c":"x\\n"}')
    for bad in ("{ }", '{"a":01}', "[1]", '{"a":1,}', '{"a"}'):
        assert not _accepts(g, bad)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
              "age": {"type": "integer"}, "kind": {"enum": ["a", "b"]}, "x": {"anyOf": [{"type": "null"},
              {"type": "number"}]}}, "required": ["name"]}  # fmt: skip
    s = compile_schema(schema)
    assert _accepts(s, '{"name":"bob","age":12,"kind":"b","x":null}')
    assert not _accepts(s, '{"name":"bobbyy","age":12,"kind":"b","x":null}')
    assert not _accepts(s, '{"name":"bob","age":1.5,"kind":"b","x":null}')
    assert not _accepts(s, '{"name":"bob","age":1,"kind":"c","x":null}')
    with pytest.raises(ValueError, match="regex"):
        compile_schema({"type": "string", "pattern": "(["})
    with pytest.raises(ValueError):
        compile_schema({"type": "strin"})
