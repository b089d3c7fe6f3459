"""The offline budget driver (generate_with_budget / chat) over a scripted LLM double."""

from __future__ import annotations

from types import SimpleNamespace

from nemotron3.engine.outputs import CompletionOutput, RequestOutput
from nemotron3.engine.reasoning import chat
from nemotron3.engine.sampling_params import SamplingParams


class ScriptedLLM:
    """LLM.generate's interface: the reply is a long thought unless the prompt ends with the closed span."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.prompts = []
        self.engine = SimpleNamespace(max_model_len=4096)

    def get_tokenizer(self):
        return self.tok

    def generate(self, prompts, params):
        prompts = prompts if isinstance(prompts, list) else [prompts]
        outs = []
        for p in prompts:
            ids = p["prompt_token_ids"]
            self.prompts.append(ids)
            text = self.tok.decode(ids, skip_special_tokens=False)
            reply = "Final answer." if text.endswith("</think>\n") else "hmm " * 50 + "\n</think>\nlate"
            out = self.tok.encode(reply) + [self.tok.eos_token_id]
            samples = []
            for j in range(params.n):
                keep = out[: params.max_tokens]
                finish = "stop" if len(keep) == len(out) else "length"
                samples.append(CompletionOutput(j, self.tok.decode(keep), keep, finish_reason=finish))
            outs.append(RequestOutput("x", None, ids, samples, True))
        return outs


def test_offline_chat_budget(tokenizer):
    llm = ScriptedLLM(tokenizer)
    close = len(tokenizer.encode("\n</think>\n"))
    (out,) = chat(llm, [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=60), thinking_budget=5)
    assert out.reasoning_tokens == 5 + close
    assert out.content == "Final answer." and out.reasoning_content == "hmm hmm hmm"[: len(out.reasoning_content)]
    (off,) = chat(llm, [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=8), enable_thinking=False)
    assert off.reasoning_tokens == 0


def test_truncation_applies_to_the_prompt_once_not_to_the_continuation(tokenizer):
    """truncate_prompt_tokens cuts the rendered prompt; the phase after the budget extends the cut prompt, and is not
    cut again (its prompt holds the reasoning so far)."""
    llm = ScriptedLLM(tokenizer)
    messages = [{"role": "user", "content": "a long question " * 20}]
    (out,) = chat(llm, messages, SamplingParams(max_tokens=60, truncate_prompt_tokens=6), thinking_budget=5)
    first, second = llm.prompts
    rendered = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    assert first == rendered[-6:] and second[:6] == first and len(second) > 6 + 5
    assert out.content == "Final answer."
