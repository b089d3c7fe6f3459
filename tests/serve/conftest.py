"""Servers for the serve tests: the embedded default model behind uvicorn, and a scripted engine double."""

from __future__ import annotations

import time

import pytest

from nemotron3.engine.outputs import CompletionOutput, RequestOutput
from nemotron3.serve.api import EngineClient, ServeConfig, ServerThread, create_app

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")


class ScriptedClient:
    """An engine double with EngineClient's interface: the reply is `script(prompt_text)`, one token per step.

    The text is encoded with the real tokenizer and followed by end-of-sequence; max_tokens and prompt
    checks behave as the engine's, so the reasoning budget driver and the parsers see real token streams.
    """

    def __init__(self, tokenizer, script, max_model_len: int = 4096) -> None:
        self.tokenizer, self.script = tokenizer, script
        self.max_model_len = max_model_len
        self.vocab_size = tokenizer.vocab_size
        self.eos_ids = {tokenizer.eos_token_id}
        self.supports_logits_processors = False
        self.prompts: list[list[int]] = []
        self.active = 0

    def alive(self) -> bool:
        return True

    def stats(self) -> dict:
        return {"num_requests_running": self.active}

    async def generate(self, prompt, params, request_id, fork_of=None):
        import asyncio

        ids = list(prompt["prompt_token_ids"])
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}")
        self.prompts.append(ids)
        out = self.tokenizer.encode(self.script(self.tokenizer.decode(ids, skip_special_tokens=False)))
        out.append(self.tokenizer.eos_token_id)
        self.active += 1
        try:
            done: list[int] = []
            for tok in out:
                await asyncio.sleep(0)
                done.append(tok)
                finish = None
                if tok == self.tokenizer.eos_token_id:
                    finish = "stop"
                elif params.max_tokens is not None and len(done) >= params.max_tokens:
                    finish = "length"
                text = self.tokenizer.decode([tok]) if tok != self.tokenizer.eos_token_id else ""
                yield RequestOutput(request_id, None, ids, [CompletionOutput(0, text, [tok], finish_reason=finish)],
                                    finish is not None)  # fmt: skip
                if finish:
                    return
        finally:
            self.active -= 1


TOOL_REPLY = (
    "The user wants the weather, I call the tool.\n</think>\n"
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n"
)
LONG_THOUGHT = " ".join(["thinking"] * 60)


def script(prompt: str) -> str:
    if prompt.endswith("</think>\n"):  # continued after the budget closed the span
        return "The answer is 5."
    if "get_weather" in prompt:
        return TOOL_REPLY
    if "think long" in prompt:
        return LONG_THOUGHT + "\n</think>\nDone."
    return "Short thought.\n</think>\nHello there!"


@pytest.fixture(scope="session")
def tokenizer():
    from nemotron3.default_model import resolve_model
    from nemotron3.io.tokenizer import Tokenizer

    return Tokenizer.from_dir(resolve_model("default"))


@pytest.fixture(scope="session")
def scripted(tokenizer):
    client = ScriptedClient(tokenizer, script)
    app = create_app(client, ServeConfig(model_names=["scripted"]))
    with ServerThread(app) as url:
        yield client, url


@pytest.fixture(scope="session")
def real():
    """The embedded default model, a small context (512) so that context errors are cheap to provoke."""
    from nemotron3.serve.api import build_client

    client = build_client("default", max_model_len=512, max_num_seqs=64, kv_cache_memory_bytes=64 << 20,
                          enable_prefix_caching=True)  # as `nemotron3 serve` runs by default
    app = create_app(client, ServeConfig(model_names=["default"]))
    with ServerThread(app) as url:
        yield client, url
    client.shutdown()


def wait_idle(client: EngineClient, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while client.engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.02)
