"""use_beam_search through the server: the offline beam search's beams as choices, and 400s for what it cannot do."""

from __future__ import annotations

import httpx
import pytest

from nemotron3 import LLM, BeamSearchParams
from tests.serve.test_server_real import HI, OFF, assert_no_leaks, oc


@pytest.fixture(scope="module")
def offline():
    return LLM("default")


def test_completion_choices_are_the_offline_beams(real, offline):
    client, url = real
    prompt = "The capital of France is"
    r = oc(url).completions.create(model="default", prompt=prompt, n=3, max_tokens=8, temperature=0, logprobs=2,
                                   extra_body={"use_beam_search": True, "length_penalty": 0.5})  # fmt: skip
    tok = offline.get_tokenizer()
    ids = tok.encode(prompt)
    (want,) = offline.beam_search({"prompt_token_ids": ids}, BeamSearchParams(beam_width=3, max_tokens=8,
                                                                              length_penalty=0.5))  # fmt: skip
    assert [c.text for c in r.choices] == [tok.decode(s.tokens[len(ids) :]) for s in want.sequences]
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c, s in zip(r.choices, want.sequences):
        assert c.finish_reason == s.finish_reason
        assert sum(c.logprobs.token_logprobs) == pytest.approx(s.cum_logprob, abs=1e-3)
    assert r.usage.completion_tokens == sum(len(s.tokens) - len(ids) for s in want.sequences)
    assert r.usage.prompt_tokens == len(ids)
    assert_no_leaks(client)


def test_chat_beams_are_parsed_like_samples(real):
    client, url = real
    r = oc(url).chat.completions.create(model="default", messages=HI, n=2, max_tokens=24, temperature=0,
                                        extra_body={"use_beam_search": True, **OFF})  # fmt: skip
    assert len(r.choices) == 2 and [c.index for c in r.choices] == [0, 1]
    assert all(isinstance(c.message.content, str) for c in r.choices)
    assert r.choices[0].message.content != r.choices[1].message.content or r.choices[0].finish_reason != "length"
    assert r.usage.completion_tokens_details.reasoning_tokens == 0  # thinking off
    thinking = oc(url).chat.completions.create(model="default", messages=HI, n=2, max_tokens=24, temperature=0,
                                               extra_body={"use_beam_search": True})  # fmt: skip
    assert thinking.usage.completion_tokens_details.reasoning_tokens > 0  # the reasoning span's tokens
    assert_no_leaks(client)


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/completions", {"stream": True}, "stream"),
        ("/v1/completions", {"stop": ["\n"]}, "stop"),
        ("/v1/completions", {"top_p": 0.5}, "top_p"),
        ("/v1/completions", {"presence_penalty": 0.5}, "presence_penalty"),
        ("/v1/completions", {"guided_regex": "[a-z]+"}, "use_beam_search"),
        ("/v1/completions", {"echo": True, "logprobs": 1}, "echo"),
        ("/v1/completions", {"length_penalty": float("inf")}, "length_penalty"),
        ("/v1/chat/completions", {"thinking_budget": 8}, "thinking_budget"),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "use_beam_search"),
        ("/v1/chat/completions", {"n": 100}, None),  # more beams than the engine's max_num_seqs
    ],
)
def test_what_beam_search_cannot_do_is_a_400_naming_it(real, path, extra, param):
    client, url = real
    body = {"model": "default", "max_tokens": 4, "use_beam_search": True, "n": 2, **extra}
    body |= {"prompt": "Hi"} if path == "/v1/completions" else {"messages": HI}
    r = httpx.post(url + path, content=_json(body), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    if param is None:
        assert "beam_width 100" in err["message"]
    assert_no_leaks(client)


def _json(body: dict) -> str:
    """JSON with infinity allowed (Python's encoder writes Infinity, which the server's parser must refuse or read)."""
    import json

    return json.dumps(body)
