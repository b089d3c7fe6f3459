"""SamplingParams.structured_outputs offline (vLLM's StructuredOutputsParams): every sample's text matches."""

from __future__ import annotations

import json
import re

import pytest

from nemotron3 import LLM, SamplingParams, StructuredOutputsParams


@pytest.fixture(scope="module")
def llm():
    return LLM("default", kv_cache_memory_bytes=64 << 20)


def texts(llm, prompt: str, n: int = 3, max_tokens: int = 40, **structured) -> list:
    params = SamplingParams(n=n, temperature=1.0, seed=0, max_tokens=max_tokens, structured_outputs=structured)
    (out,) = llm.generate([prompt], params)
    assert all(c.finish_reason == "stop" for c in out.outputs), [c.finish_reason for c in out.outputs]
    return [c.text for c in out.outputs]


def test_regex_samples_are_full_matches(llm):
    for text in texts(llm, "Call me at", regex=r"\(\d{3}\) \d{3}-\d{4}"):
        assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", text), text


def test_choice_samples_are_one_of_the_choices(llm):
    choices = ["red", "green", "light blue"]
    got = texts(llm, "My favourite colour is", n=6, choice=choices)
    assert set(got) <= set(choices)


def test_json_schema_samples_parse_and_follow_the_schema(llm):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}  # fmt: skip
    for text in texts(llm, "A person:", n=2, max_tokens=60, json=schema):
        value = json.loads(text)
        assert set(value) == {"name", "age"} and isinstance(value["age"], int) and len(value["name"]) <= 12


def test_params_object_and_greedy(llm):
    spec = StructuredOutputsParams(regex=r"(yes|no)")
    (out,) = llm.generate(["Is it raining?"], SamplingParams(temperature=0.0, max_tokens=5, structured_outputs=spec))
    assert out.outputs[0].text in ("yes", "no")


def test_unconstrained_requests_beside_constrained_ones_are_unchanged(llm):
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    alone = llm.generate(["Once upon a time"], plain)[0].outputs[0].token_ids
    both = llm.generate(
        ["Once upon a time", "Answer:"],
        [plain, SamplingParams(temperature=0.0, max_tokens=8, structured_outputs={"choice": ["A", "B"]})],
    )
    assert both[0].outputs[0].token_ids == alone and both[1].outputs[0].text in ("A", "B")


def test_bad_specs_and_engines_are_refused(llm):
    with pytest.raises(ValueError, match=r"structured_outputs.regex: .*missing '\)'"):
        SamplingParams(structured_outputs={"regex": "(a"})
    with pytest.raises(ValueError, match="exactly one of"):
        SamplingParams(structured_outputs={"regex": "a", "choice": ["a"]})
    with pytest.raises(ValueError, match="grammar"):
        SamplingParams(structured_outputs={"grammar": "root ::= 'a'"})
    tokenless = LLM(llm.engine.model, kv_cache_memory_bytes=64 << 20)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        tokenless.generate([[5, 6, 7]], SamplingParams(structured_outputs={"choice": ["a"]}))
