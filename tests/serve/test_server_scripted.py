"""The server over a scripted engine double: tool calls, the budget driver, errors, API key and CORS."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from nemotron3.serve.api import ServeConfig, ServerThread, create_app

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather forecast",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                         "required": ["city"]}}}]  # fmt: skip
MSG = [{"role": "user", "content": "What is the weather in Paris?"}]


def oc(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def test_tool_calls(scripted):
    _, url = scripted
    r = oc(url).chat.completions.create(model="scripted", messages=MSG, tools=TOOLS, max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "The user wants the weather, I call the tool."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    # the assistant turn with its tool call and the tool result go back into the template
    follow = MSG + [choice.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]  # fmt: skip
    r2 = oc(url).chat.completions.create(model="scripted", messages=follow, tools=TOOLS, max_tokens=200)
    assert r2.choices[0].message.tool_calls  # the script calls again; the point is the request renders


def test_tool_calls_streaming(scripted):
    _, url = scripted
    stream = oc(url).chat.completions.create(model="scripted", messages=MSG, tools=TOOLS, max_tokens=200, stream=True)
    reasoning, content, calls, finish = "", "", [], None
    for chunk in stream:
        d = chunk.choices[0].delta
        reasoning += getattr(d, "reasoning_content", None) or ""
        content += d.content or ""
        calls += d.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert reasoning.strip() == "The user wants the weather, I call the tool."
    assert content.strip() == "" and finish == "tool_calls"
    assert len(calls) == 1 and json.loads(calls[0].function.arguments) == {"city": "Paris", "days": 3}


def test_tool_choice_none_leaves_text(scripted):
    _, url = scripted
    r = oc(url).chat.completions.create(model="scripted", messages=MSG, tools=TOOLS, tool_choice="none", max_tokens=200)
    assert r.choices[0].message.tool_calls is None


@pytest.mark.parametrize("stream", [False, True])
def test_budget_closes_the_span(scripted, tokenizer, stream):
    client, url = scripted
    budget = 8
    msgs = [{"role": "user", "content": "please think long"}]
    kw = {"model": "scripted", "messages": msgs, "max_tokens": 100, "extra_body": {"thinking_budget": budget}}
    if stream:
        chunks = list(oc(url).chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
    else:
        r = oc(url).chat.completions.create(**kw)
        reasoning, content, usage = r.choices[0].message.reasoning_content, r.choices[0].message.content, r.usage
    close = len(tokenizer.encode("\n</think>\n"))
    assert usage.completion_tokens_details.reasoning_tokens == budget + close
    assert content.strip() == "The answer is 5."
    assert reasoning.strip() == tokenizer.decode(tokenizer.encode(" ".join(["thinking"] * 60))[:budget]).strip()
    assert client.prompts[-1][-close:] == tokenizer.encode("\n</think>\n")  # continued after the injected close


def test_effort_and_thinking_off(scripted):
    client, url = scripted
    r = oc(url).chat.completions.create(model="scripted", messages=MSG[:0] + [{"role": "user", "content": "hi"}],
                                        max_tokens=50, reasoning_effort="none")  # fmt: skip
    prompt = client.tokenizer.decode(client.prompts[-1], skip_special_tokens=False)
    assert prompt.endswith("<think></think>")
    assert r.usage.completion_tokens_details.reasoning_tokens == 0


def _post(url, path, body, **kw):
    return httpx.post(
        url + path, content=body if isinstance(body, (bytes, str)) else json.dumps(body), timeout=30, **kw
    )


@pytest.mark.parametrize(
    "body, status",
    [
        (b"{not json", 400),
        ({"model": "nope", "messages": MSG}, 404),
        ({"model": "scripted", "messages": MSG, "temperature": "hot"}, 400),
        ({"model": "scripted", "messages": MSG, "n": 0}, 400),
        ({"model": "scripted", "messages": MSG, "max_tokens": 0}, 400),
        ({"model": "scripted", "messages": "hello"}, 400),
        (
            {
                "model": "scripted",
                "messages": MSG,
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"a": {"type": "nonsense"}}},
                        },
                    }
                ],
            },
            400,
        ),
        (
            {
                "model": "scripted",
                "messages": MSG,
                "tool_choice": {"type": "function", "function": {"name": "g"}},
                "tools": TOOLS,
            },
            400,
        ),
        ({"model": "scripted", "messages": MSG, "reasoning_effort": "extreme"}, 400),
        ({"model": "scripted", "messages": MSG, "max_tokens": 5000}, 400),
    ],
)
def test_bad_requests_then_keeps_serving(scripted, body, status):
    _, url = scripted
    r = _post(url, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    ok = oc(url).chat.completions.create(model="scripted", messages=MSG[:0] + [{"role": "user", "content": "hi"}],
                                         max_tokens=20)  # fmt: skip
    assert ok.choices[0].message.content == "Hello there!"


def test_openai_client_raises_typed_errors(scripted):
    _, url = scripted
    with pytest.raises(openai.NotFoundError):
        oc(url).chat.completions.create(model="nope", messages=MSG)
    with pytest.raises(openai.BadRequestError):
        oc(url).completions.create(model="scripted", prompt="x", max_tokens=0)


def test_api_key_and_cors(scripted):
    client, _ = scripted
    app = create_app(client, ServeConfig(model_names=["scripted"], api_key="sekret", cors_origins=["http://ui.test"]))
    with ServerThread(app) as url:
        with pytest.raises(openai.AuthenticationError):
            oc(url, "wrong").models.list()
        assert [m.id for m in oc(url, "sekret").models.list().data] == ["scripted"]
        assert httpx.get(url + "/health").status_code == 200  # health needs no key
        pre = httpx.options(url + "/v1/chat/completions", headers={"Origin": "http://ui.test",
                            "Access-Control-Request-Method": "POST"})  # fmt: skip
        assert pre.headers.get("access-control-allow-origin") == "http://ui.test"


def test_models_health_metrics(scripted):
    _, url = scripted
    models = oc(url).models.list()
    assert [m.id for m in models.data] == ["scripted"]
    assert httpx.get(url + "/health").status_code == 200
    text = httpx.get(url + "/metrics").text
    assert "nemotron3_requests_total" in text and "nemotron3_time_to_first_token_seconds_bucket" in text
