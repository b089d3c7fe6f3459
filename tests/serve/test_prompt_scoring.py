"""Scoring prompts through the server: OpenAI's legacy echo + logprobs (what lm-evaluation-harness's
local-completions model sends for log-likelihoods) and vLLM's `prompt_logprobs`, on the embedded default model,
against the model's own full forward."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from nemotron3 import load_model
from nemotron3.default_model import resolve_model

# The engine (chunked prefill, fused native kernels) and the plain module forward both run float32 over the
# default model; log-probs are O(10) over its vocabulary, so float32's ~1e-6 relative rounding on each side
# and differently ordered sums stay well inside 1e-3, while a wrong position or token moves a value by O(1).
ATOL = 1e-3


@pytest.fixture(scope="module")
def reference_logprobs():
    """log_softmax of the default model's plain forward, [len(ids), V] per token-id prompt."""
    model = load_model(resolve_model("default")).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    return run


def prompt_ids(real, text: str) -> list[int]:
    return real[0].tokenizer.encode(text)


def test_echo_with_logprobs_scores_a_continuation_as_lm_eval_reads_it(real, reference_logprobs):
    """lm-eval's loglikelihood request: token-id prompts, echo, logprobs=1, max_tokens=1; it sums
    token_logprobs[ctxlen:-1] and calls the continuation greedy when each token's logprob is its top one."""
    _, url = real
    context, continuation = prompt_ids(real, "The cat sat on"), prompt_ids(real, " the mat")
    ids = context + continuation
    body = {"model": "default", "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "echo": True}
    choice = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = reference_logprobs(ids)
    want = [ref[p - 1, ids[p]].item() for p in range(1, len(ids))]
    assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(want, abs=ATOL)
    ctxlen = len(context)
    assert sum(lp["token_logprobs"][ctxlen:-1]) == pytest.approx(sum(want[ctxlen - 1 :]), abs=ATOL * len(continuation))
    greedy = all(
        t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1])
    )
    assert greedy == all(ref[p - 1].argmax().item() == ids[p] for p in range(ctxlen, len(ids)))
    for p in range(1, len(ids)):  # top_logprobs hold the reference's most likely token
        ((_, value),) = lp["top_logprobs"][p].items()
        assert value == pytest.approx(ref[p - 1].max().item(), abs=ATOL)
    assert choice["text"].startswith(real[0].tokenizer.decode(ids))


def test_prompt_logprobs_in_vllms_shape(real, reference_logprobs):
    _, url = real
    ids = prompt_ids(real, "Once upon a time there was")
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0).completions.create(
        model="default", prompt=ids, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 2}
    )
    got = c.choices[0].model_extra["prompt_logprobs"]
    ref = reference_logprobs(ids)
    assert len(got) == len(ids) and got[0] is None
    for p in range(1, len(ids)):
        entry = {int(t): v for t, v in got[p].items()}
        assert ids[p] in entry and 2 <= len(entry) <= 3  # the prompt token, and the 2 most likely
        own = entry[ids[p]]
        assert own["logprob"] == pytest.approx(ref[p - 1, ids[p]].item(), abs=ATOL)
        row = ref[p - 1]  # its rank, up to tokens within ATOL of it, which may order either way
        assert int((row > row[ids[p]] + ATOL).sum()) + 1 <= own["rank"] <= int((row > row[ids[p]] - ATOL).sum()) + 1
        assert own["decoded_token"] == real[0].tokenizer.decode([ids[p]], skip_special_tokens=False)
        best = ref[p - 1].topk(2)
        for tid, value in zip(best.indices.tolist(), best.values.tolist()):
            assert entry[tid]["logprob"] == pytest.approx(value, abs=ATOL)


def test_chat_prompt_logprobs_score_the_rendered_prompt(real, reference_logprobs):
    client, url = real
    messages = [{"role": "user", "content": "What is 2+3?"}]
    body = {"model": "default", "messages": messages, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 0,
            "chat_template_kwargs": {"enable_thinking": False}}  # fmt: skip
    got = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["prompt_logprobs"]
    tok = client.tokenizer
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False))
    ref = reference_logprobs(ids)
    assert len(got) == len(ids) and got[0] is None
    values = [got[p][str(ids[p])]["logprob"] for p in range(1, len(ids))]
    assert values == pytest.approx([ref[p - 1, ids[p]].item() for p in range(1, len(ids))], abs=ATOL)


def test_streamed_echo_sends_the_scored_prompt_first(real):
    _, url = real
    ids = prompt_ids(real, "A short prompt")
    body = {"model": "default", "prompt": ids, "max_tokens": 3, "temperature": 0, "logprobs": 1, "echo": True}
    whole = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    chunks = []
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(httpx.Response(200, content=line[6:]).json()["choices"][0])
    first = chunks[0]["logprobs"]
    assert first["tokens"] == whole["tokens"][: len(ids)] and first["token_logprobs"][0] is None
    assert first["token_logprobs"][1:] == pytest.approx(whole["token_logprobs"][1 : len(ids)], abs=1e-6)
    streamed = [v for c in chunks if c["logprobs"] for v in c["logprobs"]["token_logprobs"]]
    assert streamed[1:] == pytest.approx(whole["token_logprobs"][1:], abs=1e-6)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "hi", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"prompt": "hi", "prompt_logprobs": -1}, "prompt_logprobs"),
        ({"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
    ],
)
def test_bad_prompt_logprobs_requests_get_a_400_naming_it(real, body, param):
    _, url = real
    r = httpx.post(url + "/v1/completions", json={"model": "default", "max_tokens": 2, **body}, timeout=30)
    assert r.status_code == 400 and param in r.text
    assert httpx.get(url + "/health", timeout=10).status_code == 200
