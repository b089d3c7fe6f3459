"""A request's n samples through the server share one prefill (fork_of) and draw what separate requests draw."""

from __future__ import annotations

import contextlib

import httpx
import pytest

from tests.serve.test_server_real import assert_no_leaks, wait_idle


@contextlib.contextmanager
def prompt_tokens_fed(client):
    """Count the prompt (non-decode) tokens the served engine's runner is fed while the block runs."""
    wait_idle(client)
    runner = client.engine.runner
    fed, step = [], runner.step

    def counting_step(segments):
        fed.append(sum(len(s.tokens) for s in segments if not s.decode))
        return step(segments)

    runner.step = counting_step
    try:
        yield fed
    finally:
        wait_idle(client)
        runner.step = step


def post(url: str, path: str, body: dict) -> dict:
    r = httpx.post(url + path, json={"model": "default", "temperature": 2.0, "seed": 5, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_n_samples_prefill_once_and_match_separate_requests(real, path):
    client, url = real
    if path == "/v1/completions":
        ids = client.tokenizer.encode("Once upon a time, in a kingdom by the sea, there lived")
        body, n_prompt = {"prompt": [ids], "max_tokens": 8}, len(ids)
    else:
        messages = [{"role": "user", "content": "Tell me about the sea and the kingdom by it."}]
        body = {"messages": messages, "max_tokens": 8, "chat_template_kwargs": {"enable_thinking": False}}
        text = client.tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
        n_prompt = len(client.tokenizer.encode(text))
    with prompt_tokens_fed(client) as fed:
        together = post(url, path, {**body, "n": 4})
    assert sum(fed) == n_prompt  # one prefill for the four samples
    field = "text" if path == "/v1/completions" else "message"
    for i, choice in enumerate(together["choices"]):  # sample i is seeded seed + i, as a lone request would be
        alone = post(url, path, {**body, "seed": 5 + i})["choices"][0]
        assert choice[field] == alone[field]
    assert len({str(c[field]) for c in together["choices"]}) > 1
    assert_no_leaks(client)


def test_prompt_scoring_with_n_still_scores_every_choice(real):
    client, url = real
    ids = client.tokenizer.encode("Once upon a time")
    out = post(url, "/v1/completions", {"prompt": ids, "max_tokens": 2, "n": 2, "echo": True, "logprobs": 1})
    a, b = (c["logprobs"]["token_logprobs"][: len(ids)] for c in out["choices"])
    assert a[0] is None and a == b and all(isinstance(x, float) for x in a[1:])


def test_streamed_samples_prefill_once_too(real):
    client, url = real
    ids = client.tokenizer.encode("The kingdom by the sea had a harbour full of")
    body = {"model": "default", "prompt": ids, "max_tokens": 6, "n": 3, "temperature": 2.0, "seed": 9, "stream": True}
    with prompt_tokens_fed(client) as fed, httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    assert sum(fed) == len(ids) and lines
    assert_no_leaks(client)
