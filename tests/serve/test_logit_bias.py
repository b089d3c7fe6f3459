"""OpenAI's logit_bias and vLLM's allowed_token_ids through the server (embedded default model)."""

from __future__ import annotations

import httpx
import openai
import pytest


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def test_a_boosted_token_is_chosen_and_a_banned_one_never(real):
    from nemotron3 import LLM, SamplingParams

    engine_client, url = real
    prompt = [5, 6, 7, 8]
    offline = LLM("default", kv_cache_memory_bytes=32 << 20, max_num_seqs=4)  # the server's weights, with token ids
    greedy = offline.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1))[0]
    first = greedy.outputs[0].token_ids[0]
    ban = SamplingParams(temperature=0, max_tokens=1, logit_bias={first: -100.0})
    unbanned = offline.generate({"prompt_token_ids": prompt}, ban)[0]
    banned = client(url).completions.create(model="default", prompt=prompt, max_tokens=1, temperature=0,
                                            logit_bias={str(first): -100})  # fmt: skip
    assert banned.choices[0].text == engine_client.tokenizer.decode(unbanned.outputs[0].token_ids)
    assert unbanned.outputs[0].token_ids[0] != first
    forced = client(url).chat.completions.create(
        model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0.7, seed=1,
        logit_bias={"42": 100}, extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )  # fmt: skip
    assert forced.choices[0].message.content == engine_client.tokenizer.decode([42] * 3)


def test_allowed_token_ids_confine_the_sample(real):
    engine_client, url = real
    allowed = [42, 43, 44]
    c = client(url).completions.create(model="default", prompt=[5, 6, 7], max_tokens=6, temperature=1.0, seed=3,
                                       logprobs=0, extra_body={"allowed_token_ids": allowed})  # fmt: skip
    ids = [engine_client.tokenizer.encode(t)[0] for t in c.choices[0].logprobs.tokens]
    assert set(ids) <= set(allowed)


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"logit_bias": {"42": 150}}, "logit_bias"),
        ({"logit_bias": {"forty": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"allowed_token_ids": [99999999]}, "allowed_token_ids"),
        ({"allowed_token_ids": [99999999], "stream": True}, "allowed_token_ids"),  # refused before the stream
        ({"allowed_token_ids": []}, "allowed_token_ids"),
    ],
)
def test_bad_edits_get_a_400_naming_them(real, extra, param):
    _, url = real
    r = httpx.post(url + "/v1/completions", json={"model": "default", "prompt": "hi", "max_tokens": 2, **extra},
                   timeout=30)  # fmt: skip
    assert r.status_code == 400 and param in r.text, r.text
    assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_truncate_prompt_tokens_in_the_server(real):
    client, url = real
    long = [5, 6, 7, 8] * 200  # 800 tokens: more than the test server's 512-token context
    body = {"model": "default", "prompt": long, "max_tokens": 2}
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400
    ok = httpx.post(url + "/v1/completions", json={**body, "truncate_prompt_tokens": -1}, timeout=60).json()
    assert ok["usage"]["prompt_tokens"] == client.max_model_len - 2
    three = httpx.post(url + "/v1/completions", json={**body, "truncate_prompt_tokens": 3, "echo": True}, timeout=60)
    assert three.json()["usage"]["prompt_tokens"] == 3
    assert three.json()["choices"][0]["text"].startswith(client.tokenizer.decode(long[-3:]))
    bad = httpx.post(url + "/v1/completions", json={**body, "truncate_prompt_tokens": 0}, timeout=30)
    assert bad.status_code == 400 and "truncate_prompt_tokens" in bad.text


def test_bad_words_in_the_server(real):
    _, url = real
    body = {"model": "default", "messages": [{"role": "user", "content": "What is 2+3?"}], "max_tokens": 4,
            "temperature": 0, "chat_template_kwargs": {"enable_thinking": False}}  # fmt: skip
    plain = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]["content"]
    word = plain.strip()[:1]
    assert word
    banned = httpx.post(url + "/v1/chat/completions", json={**body, "bad_words": [word]}, timeout=60).json()
    assert word not in banned["choices"][0]["message"]["content"]
    bad = httpx.post(url + "/v1/chat/completions", json={**body, "bad_words": [" "]}, timeout=30)
    assert bad.status_code == 400 and "bad_words" in bad.text
