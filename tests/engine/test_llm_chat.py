"""LLM.chat (vLLM's offline chat API) on the embedded default model: rendering, batching and refusals."""

from __future__ import annotations

import pytest

from nemotron3 import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
OFF = {"enable_thinking": False}


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("default", kv_cache_memory_bytes=32 << 20, max_model_len=512)


def test_chat_is_generate_on_the_rendered_conversation(llm):
    tok = llm.get_tokenizer()
    conversations = [
        [{"role": "user", "content": "What is 2+3?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    ]
    outs = llm.chat(conversations, GREEDY, chat_template_kwargs=OFF)
    for conv, out in zip(conversations, outs):
        text = tok.apply_chat_template(conv, add_generation_prompt=True, enable_thinking=False)
        assert out.prompt == text and out.prompt_token_ids == tok.encode(text)
        assert out.outputs[0].token_ids == llm.generate(text, GREEDY)[0].outputs[0].token_ids
    one = llm.chat(conversations[0], GREEDY, chat_template_kwargs=OFF)  # a single conversation
    assert len(one) == 1 and one[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    thinking = llm.chat(conversations[0], GREEDY)[0]  # the template's default: reasoning on, the span opened
    assert thinking.prompt.endswith("<think>\n")


def test_continue_final_message_extends_the_assistants_reply(llm):
    conv = [{"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "One, two,"}]
    out = llm.chat(conv, GREEDY, add_generation_prompt=False, continue_final_message=True, chat_template_kwargs=OFF)[0]
    assert out.prompt.endswith("One, two,") and "<|im_end|>" not in out.prompt[-12:]


@pytest.mark.parametrize(
    "messages, options, match",
    [
        ([], {}, "messages"),
        ([["not a dict"]], {}, "messages"),
        ([{"content": "no role"}], {}, "role"),
        ([{"role": "user", "content": "hi"}], {"continue_final_message": True}, "cannot both be true"),
    ],
)
def test_bad_chats_raise_value_errors_that_say_why(llm, messages, options, match):
    with pytest.raises(ValueError, match=match):
        llm.chat(messages, GREEDY, **options)
    assert not llm.engine.has_unfinished_requests()


def test_a_model_without_a_tokenizer_cannot_chat():
    from nemotron3.model import NemotronHForCausalLM
    from tests.engine.test_engine import CONFIG

    with pytest.raises(ValueError, match="tokenizer"):
        LLM(NemotronHForCausalLM(CONFIG), kv_cache_memory_bytes=8 << 20).chat([{"role": "user", "content": "hi"}])
