"""`nemotron3 chat` tool calls: the demo tools, a ChatSession driven by a scripted engine, `--message` mode."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from rich.console import Console

from nemotron3.engine.outputs import CompletionOutput, RequestOutput
from nemotron3.engine.sampling_params import SamplingParams
from nemotron3.serve.chat import ChatSession
from nemotron3.serve.tools import DEMO_TOOLS, TABLES, run_tool

CALL = ("The user wants a sum; the calculator does exact arithmetic.\n</think>\n"
        "<tool_call>\n<function=calculator>\n<parameter=expression>\n12 + 30\n</parameter>\n</function>\n</tool_call>\n")  # fmt: skip


class FakeClient:
    """What ChatSession needs of an engine client: `.tokenizer`, `.max_model_len` and `generate` (used by
    stream_with_budget); the reply is `script(prompt_text)`, streamed one token per step, then end-of-sequence."""

    def __init__(self, tokenizer, script, max_model_len: int = 4096) -> None:
        self.tokenizer, self.script, self.max_model_len = tokenizer, script, max_model_len
        self.prompts: list[str] = []

    async def generate(self, prompt, params, request_id, fork_of=None):
        ids = list(prompt["prompt_token_ids"])
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        self.prompts.append(text)
        out = self.tokenizer.encode(self.script(text)) + [self.tokenizer.eos_token_id]
        done: list[int] = []
        for tok in out:
            await asyncio.sleep(0)
            done.append(tok)
            finish = "stop" if tok == self.tokenizer.eos_token_id else None
            if finish is None and params.max_tokens is not None and len(done) >= params.max_tokens:
                finish = "length"
            piece = self.tokenizer.decode([tok]) if tok != self.tokenizer.eos_token_id else ""
            yield RequestOutput(request_id, None, ids, [CompletionOutput(0, piece, [tok], finish_reason=finish)],
                                finish is not None)  # fmt: skip
            if finish:
                return


def _session(tokenizer, script, **kw) -> tuple[ChatSession, FakeClient, io.StringIO]:
    client, out = FakeClient(tokenizer, script), io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    return ChatSession(client, console, SamplingParams(max_tokens=200, temperature=0.0), **kw), client, out


# ---- run_tool -------------------------------------------------------------------------------------------
def test_run_tool_good_calls():
    assert json.loads(run_tool({"name": "calculator", "arguments": {"expression": "(12 + 3) * 4 - 5"}})) == {
        "result": 55
    }
    openai_call = {"id": "call_1", "type": "function",
                   "function": {"name": "lookup", "arguments": '{"table": "elevation", "key": "fenton"}'}}  # fmt: skip
    assert json.loads(run_tool(openai_call)) == {
        "table": "elevation",
        "key": "Fenton",
        "value": TABLES["elevation"]["Fenton"],
    }
    assert all(len(rows) == 12 for rows in TABLES.values())
    assert [t["function"]["name"] for t in DEMO_TOOLS] == ["calculator", "lookup"]


@pytest.mark.parametrize("call, words", [
    ({"name": "weather", "arguments": {"city": "Paris"}}, ["unknown tool", "weather"]),
    ({"name": "calculator", "arguments": {"expression": "12 +"}}, ["calculator", "malformed", "12 +"]),
    ({"name": "calculator", "arguments": {"expression": "2 3"}}, ["malformed"]),
    ({"name": "calculator", "arguments": {"expression": "__import__('os')"}}, ["malformed"]),
    ({"name": "calculator", "arguments": {}}, ["missing", "expression"]),
    ({"name": "lookup", "arguments": {"table": "inventory"}}, ["missing", "key"]),
    ({"name": "lookup", "arguments": {"table": "inventory", "key": "x", "n": 1}}, ["unexpected", "n"]),
    ({"name": "lookup", "arguments": {"table": "inventory", "key": "unicorn horn"}}, ["unknown key", "unicorn horn"]),
    ({"name": "lookup", "arguments": {"table": "prices", "key": "x"}}, ["unknown table", "prices"]),
    ({"name": "calculator", "arguments": "{not json"}, ["not valid JSON"]),
    ("garbage", ["unknown tool"]),
])  # fmt: skip
def test_run_tool_bad_calls_answer_errors(call, words):
    result = json.loads(run_tool(call))
    assert list(result) == ["error"]
    assert all(w in result["error"] for w in words), result


# ---- ChatSession ----------------------------------------------------------------------------------------
def _calculator_then_answer(prompt: str) -> str:
    if "<tool_response>" in prompt:
        return "12 + 30 = 42."  # after a tool result the chat renders thinking off: the answer comes directly
    return CALL


def test_session_runs_the_tool_then_answers(tokenizer):
    session, client, out = _session(tokenizer, _calculator_then_answer, tools=DEMO_TOOLS)
    answer = asyncio.run(session.turn("What is 12 + 30?"))
    assert answer == "12 + 30 = 42."
    roles = [m["role"] for m in session.messages]
    assert roles == ["user", "assistant", "tool", "assistant"]
    call_msg, tool_msg, final = session.messages[1:]
    (call,) = call_msg["tool_calls"]
    assert call["function"] == {"name": "calculator", "arguments": {"expression": "12 + 30"}}
    assert call_msg["content"] == "" and "calculator" in call_msg["reasoning_content"]
    assert tool_msg["tool_call_id"] == call["id"] and tool_msg["name"] == "calculator"
    assert json.loads(tool_msg["content"]) == {"result": 42}
    assert final["content"] == "12 + 30 = 42."
    # the tools were offered, and the second prompt carries the call and its response as the model was trained
    assert "<function>\n<name>calculator</name>" in client.prompts[0]
    assert '<tool_response>\n{"result": 42}\n</tool_response>' in client.prompts[1]
    assert client.prompts[1].rstrip().endswith("<think></think>")  # the tool-use training data's answer turn
    assert "<function=calculator>\n<parameter=expression>\n12 + 30\n</parameter>" in client.prompts[1]
    shown = out.getvalue()
    assert '⚙ calculator(expression="12 + 30")' in shown and '{"result": 42}' in shown
    assert "<tool_call>" not in shown


def test_round_limit_stops_a_model_that_calls_forever(tokenizer):
    session, client, out = _session(tokenizer, lambda prompt: CALL, tools=DEMO_TOOLS, max_tool_rounds=2)
    asyncio.run(session.turn("What is 12 + 30?"))
    assert len(client.prompts) == 3  # the first answer + one per round
    roles = [m["role"] for m in session.messages]
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert "tool_calls" not in session.messages[-1]  # the last calls were not run
    assert "limit reached" in out.getvalue()


def test_tools_off_and_toggle(tokenizer):
    session, client, _ = _session(tokenizer, _calculator_then_answer)
    asyncio.run(session.turn("What is 12 + 30?"))
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert "<tool_call>" in session.messages[-1]["content"] and "# Tools" not in client.prompts[0]
    session.command("/tools on")
    assert session.tools == DEMO_TOOLS
    session.command("/reset")
    asyncio.run(session.turn("What is 12 + 30?"))
    assert [m["role"] for m in session.messages] == ["user", "assistant", "tool", "assistant"]
    session.command("/tools off")
    assert session.tools is None


def test_context_error_rolls_back_the_turn(tokenizer):
    session, client, _ = _session(tokenizer, _calculator_then_answer, tools=DEMO_TOOLS)
    client.max_model_len = 10
    with pytest.raises(ValueError, match="context"):
        asyncio.run(session.turn("What is 12 + 30?"))
    assert session.messages == []


# ---- nemotron3 chat --message ---------------------------------------------------------------------------
def test_message_mode_runs_turns_and_exits(capsys):
    from nemotron3.cli import main

    code = main(["chat", "default", "--message", "What is 12 + 30?", "--message", "/think off",
                 "--message", "Thanks", "--tools", "--max-tokens", "8", "--max-model-len", "1024"])  # fmt: skip
    assert code == 0
    shown = capsys.readouterr().out
    assert "> What is 12 + 30?" in shown and "> Thanks" in shown
