"""Synthetic tasks: determinism, verifiers, step-by-step arithmetic traces, retrieval length/depth, tool calls."""

from __future__ import annotations

import ast
import json
import operator
import random
import re

import pytest

from nemotron3.train.tasks import (
    DOMAINS,
    TaskInstance,
    arithmetic_task,
    generate,
    gold_output,
    parse_tool_calls,
    render_conversation,
    render_plain,
    retrieval_task,
    verify,
)


@pytest.mark.parametrize("domain", DOMAINS)
def test_generation_is_deterministic_per_seed(domain):
    assert generate(domain, 20, seed=11) == generate(domain, 20, seed=11)
    assert generate(domain, 20, seed=11) != generate(domain, 20, seed=12)
    assert all(isinstance(t, TaskInstance) and t.domain == domain for t in generate(domain, 5, seed=0))


@pytest.mark.parametrize("domain", DOMAINS)
def test_verify_accepts_gold_outputs_and_rejects_wrong_ones(domain):
    for inst in generate(domain, 40, seed=3):
        final = gold_output(inst)
        assert verify(inst, final), final
        assert final in render_conversation(inst)
        assert verify(inst, f"{inst.answer}") and verify(inst, f"<think>\nhmm\n</think>\nThe answer is {inst.answer}.")
        assert not verify(inst, f"<think>\n{inst.reasoning}")  # thinking never closed: no answer
        assert not verify(inst, "")
        assert not verify(inst, final.rsplit("</think>", 1)[0] + f"</think>\n{_wrong(inst)}")
        assert not verify(inst, f"<think>The answer is {inst.answer}</think>\nThe answer is {_wrong(inst)}.")


def _wrong(inst: TaskInstance) -> str:
    """A near-miss answer: off by one, or the list with its first two elements swapped (or one changed)."""
    if inst.domain != "sorting":
        return str(int(inst.answer) + 1)
    items = inst.metadata["result"]
    bad = items[1:2] + items[:1] + items[2:] if len(items) > 1 and items[0] != items[1] else [items[0] + 1, *items[1:]]
    return ", ".join(map(str, bad))


def test_arithmetic_traces_are_correct_step_by_step():
    rng = random.Random(0)
    for op in ("add", "sub", "mul"):
        for _ in range(150):
            inst = arithmetic_task(rng, digits=(1, 7), operations=(op,))
            a, b, result = inst.metadata["a"], inst.metadata["b"], inst.metadata["result"]
            assert result == {"add": a + b, "sub": a - b, "mul": a * b}[op] == int(inst.answer)
            {"add": _check_addition, "sub": _check_subtraction, "mul": _check_multiplication}[op](inst.reasoning, a, b)
            assert inst.reasoning.splitlines()[-1] == f"So {a} {'+-*'[['add', 'sub', 'mul'].index(op)]} {b} = {result}."


def _lsb(x: int, width: int) -> list[int]:
    return [int(c) for c in reversed(str(x).zfill(width))]


def _check_addition(trace: str, a: int, b: int) -> None:
    rows = re.findall(r"column (\d+): (\d) \+ (\d) \+ carry (\d) = (\d+), write (\d), carry (\d)", trace)
    width = max(len(str(a)), len(str(b)))
    assert len(rows) == width
    da, db, carry, written = _lsb(a, width), _lsb(b, width), 0, []
    for i, (col, x, y, c, s, w, c_out) in enumerate([int(v) for v in r] for r in rows):
        assert (col, x, y, c) == (i + 1, da[i], db[i], carry)
        assert s == x + y + c and w == s % 10 and c_out == s // 10
        carry = c_out
        written.append(w)
    if carry:
        assert f"The final carry {carry} becomes the leading digit." in trace
        written.append(carry)
    assert f"from the last column to the first: {''.join(map(str, reversed(written)))}." in trace


def _check_subtraction(trace: str, a: int, b: int) -> None:
    big, small = max(a, b), min(a, b)
    if a < b:
        assert f"compute {big} - {small} and make the result negative" in trace
    rows = re.findall(r"column (\d+): (\d) - (\d) - borrow (\d) = (-?\d+)(?:, negative so add 10: (\d))?, "
                      r"write (\d), borrow (\d)", trace)  # fmt: skip
    width = len(str(big))
    assert len(rows) == width
    dg, ds, borrow, written = _lsb(big, width), _lsb(small, width), 0, []
    for i, (col, x, y, br, v, plus10, w, b_out) in enumerate(rows):
        col, x, y, br, v, w, b_out = map(int, (col, x, y, br, v, w, b_out))
        assert (col, x, y, br) == (i + 1, dg[i], ds[i], borrow)
        assert v == x - y - br and b_out == (v < 0) and w == (v + 10 if v < 0 else v)
        assert (plus10 != "") == (v < 0) and (not plus10 or int(plus10) == v + 10)
        borrow = b_out
        written.append(w)
    assert borrow == 0
    digits = "".join(map(str, reversed(written)))
    assert f"from the last column to the first: {digits}" in trace and int(digits) == big - small


def _check_multiplication(trace: str, a: int, b: int) -> None:
    partials = [tuple(map(int, r)) for r in re.findall(rf"^{a} \* (\d+) = (\d+)$", trace, re.MULTILINE)]
    assert [m for m, _ in partials] == [d * 10**j for j, d in enumerate(_lsb(b, len(str(b))))]
    assert all(p == a * m for m, p in partials)
    sums = [
        tuple(map(int, r))
        for r in re.findall(r"^(?:Add the partial products: )?(\d+) \+ (\d+) = (\d+)$", trace, re.MULTILINE)
    ]
    assert len(sums) == len(partials) - 1
    total = partials[0][1]
    for (x, y, s), (_, p) in zip(sums, partials[1:]):
        assert (x, y, s) == (total, p, total + p)
        total = s
    assert total == a * b


def test_arithmetic_digit_counts_are_honoured():
    rng = random.Random(1)
    for _ in range(50):
        m = arithmetic_task(rng, digits=5).metadata
        assert len(str(m["a"])) == len(str(m["b"])) == 5
    with pytest.raises(ValueError, match="digits"):
        arithmetic_task(rng, digits=(3, 2))


def test_retrieval_length_and_depth_are_honoured():
    rng = random.Random(2)
    inst = retrieval_task(rng, num_pairs=50, depth=0.0)
    assert inst.metadata["num_pairs"] == 50 and inst.metadata["needle_index"] == 0
    assert retrieval_task(rng, num_pairs=50, depth=1.0).metadata["needle_index"] == 49
    for target in (500, 4000, 20000):
        for depth in (0.1, 0.5, 0.9):
            inst = retrieval_task(rng, context_chars=target, depth=depth)
            m = inst.metadata
            assert target <= m["context_chars"] < target + 40  # one line at most past the target
            context = inst.prompt[: m["context_chars"]]
            line = f"{m['key']}: {m['value']}\n"
            assert context[m["needle_offset"] :].startswith(line) and context.count(f"{m['key']}:") == 1
            assert abs(m["needle_offset"] / m["context_chars"] - depth) < (0.06 if target > 500 else 0.2)
            assert int(inst.answer) == m["value"] and f"value of {m['key']}?" in inst.prompt


def test_retrieval_length_in_tokens():
    count = lambda text: len(re.findall(r"\w+|[^\w\s]", text))  # a stand-in tokenizer
    inst = retrieval_task(random.Random(3), context_tokens=1000, count_tokens=count, depth=0.25)
    assert 1000 <= inst.metadata["context_tokens"] < 1000 + 10
    with pytest.raises(ValueError, match="count_tokens"):
        retrieval_task(random.Random(3), context_tokens=1000)
    with pytest.raises(ValueError, match="at most one"):
        retrieval_task(random.Random(3), num_pairs=3, context_chars=100)


def test_sorting_answers():
    for inst in generate("sorting", 60, seed=4, length=(1, 12)):
        items, result, op = inst.metadata["items"], inst.metadata["result"], inst.metadata["op"]
        expected = {"sort_ascending": sorted(items), "sort_descending": sorted(items, reverse=True),
                    "reverse": items[::-1]}[op]  # fmt: skip
        assert result == expected and inst.answer == ", ".join(map(str, expected))
        assert verify(inst, f"<think></think>[{inst.answer}]")


def test_tool_calls_are_well_formed_and_verified():
    for inst in generate("tool_use", 40, seed=5):
        call = inst.metadata["tool_call"]
        messages = inst.as_messages()
        assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
        fn = messages[1]["tool_calls"][0]["function"]
        assert fn == {"name": call["name"], "arguments": call["arguments"]}
        assert json.loads(json.dumps(fn["arguments"])) == call["arguments"]  # JSON-serialisable arguments
        response = json.loads(messages[2]["content"])
        if call["name"] == "calculator":
            assert response["result"] == _safe_eval(call["arguments"]["expression"]) == int(inst.answer)
        else:
            assert inst.metadata["table"][call["arguments"]["key"]] == response["value"] == int(inst.answer)
        assert {t["function"]["name"] for t in inst.tools} == {"calculator", "lookup"}
        # the tool-call turn as the model should emit it (Nemotron 3 XML form), and as a JSON body
        first = gold_output(inst, turn=0)
        assert parse_tool_calls(first) == [
            {"name": call["name"], "arguments": {k: str(v) for k, v in call["arguments"].items()}}
        ]
        assert verify(inst, first)
        as_json = json.dumps({"name": call["name"], "arguments": call["arguments"]})
        assert verify(inst, f"<think></think><tool_call>\n{as_json}\n</tool_call>")
        # arguments as a JSON string (the OpenAI wire form)
        string_arguments = json.dumps({"name": call["name"], "arguments": json.dumps(call["arguments"])})
        assert verify(inst, f"<tool_call>{string_arguments}</tool_call>")
        wrong = json.dumps({"name": call["name"], "arguments": {**call["arguments"], "key": "x", "expression": "1"}})
        assert not verify(inst, f"<think></think><tool_call>\n{wrong}\n</tool_call>")
        first_argument = next(iter(call["arguments"]))
        wrong_value = dict(call["arguments"], **{first_argument: "999 + 1"})
        assert not verify(
            inst, f"<tool_call>{json.dumps({'name': call['name'], 'arguments': wrong_value})}</tool_call>"
        )
        other = "lookup" if call["name"] == "calculator" else "calculator"
        assert not verify(inst, first.replace(f"<function={call['name']}>", f"<function={other}>"))


def _safe_eval(expression: str) -> int:
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

    def walk(node):
        if isinstance(node, ast.BinOp):
            return ops[type(node.op)](walk(node.left), walk(node.right))
        assert isinstance(node, ast.Constant) and isinstance(node.value, int)
        return node.value

    return walk(ast.parse(expression, mode="eval").body)


def test_render_plain_and_conversation():
    inst = generate("tool_use", 1, seed=6)[0]
    plain = render_plain(inst)
    assert plain.startswith(f"Question: {inst.prompt}\n") and plain.endswith(f"Answer: {inst.answer}\n")
    assert "Tool call: " in plain and "Tool result: " in plain and "<" not in plain.replace(inst.prompt, "")
    chat = render_conversation(inst, system="Use tools.")
    assert chat.startswith("<|im_start|>system\nUse tools.\n\n# Tools") and "<tool_response>\n" in chat
    assert chat.count("<|im_start|>assistant\n") == 2 and inst.reasoning in chat
    arith = generate("arithmetic", 1, seed=6)[0]
    assert render_plain(arith) == f"Question: {arith.prompt}\nReasoning: {arith.reasoning}\nAnswer: {arith.answer}\n"


def test_unknown_domain_is_named():
    with pytest.raises(ValueError, match="'poetry'"):
        generate("poetry", 1, seed=0)
