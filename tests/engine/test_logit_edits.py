"""logit_bias and allowed_token_ids through the engine: greedy choices against transformers' logits, the speculative
engine, and refusals."""

import pytest
import torch

from nemotron3 import SamplingParams
from nemotron3.engine.llm import LLM
from tests.engine.test_engine import CONFIG, hf_and_ours

ALLOWED = [7, 19, 42, 100, 250, 311]


@pytest.fixture(scope="module")
def models():
    return hf_and_ours(5)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(3, CONFIG.vocab_size, (13,), generator=torch.Generator().manual_seed(6)).tolist()


def reference_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def test_greedy_with_allowed_tokens_is_the_argmax_among_them(models, prompt):
    hf, ours = models
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, allowed_token_ids=ALLOWED)
    out = LLM(ours, max_num_batched_tokens=5).generate({"prompt_token_ids": prompt}, params)[0].outputs[0].token_ids
    logits = reference_logits(hf, prompt + out)[len(prompt) - 1 : -1]
    assert out == [ALLOWED[i] for i in logits[:, ALLOWED].argmax(-1).tolist()]


def test_a_ban_and_a_boost_move_the_greedy_choice(models, prompt):
    hf, ours = models
    llm = LLM(ours)
    plain = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=1))[0]
    first = plain.outputs[0].token_ids[0]
    row = reference_logits(hf, prompt)[-1]
    banned = llm.generate({"prompt_token_ids": prompt},
                          SamplingParams(temperature=0.0, max_tokens=1, logit_bias={first: -100.0}))[0]  # fmt: skip
    assert banned.outputs[0].token_ids[0] == row.topk(2).indices[1].item()
    weakest = int(row.argmin())
    boosted = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=3,
                                                                         logit_bias={weakest: 100.0}))[0]  # fmt: skip
    assert boosted.outputs[0].token_ids == [weakest] * 3


def test_the_speculative_engine_decodes_edited_rows_as_the_plain_one(models, prompt):
    from nemotron3.config import preset
    from nemotron3.model import NemotronHForCausalLM

    model = NemotronHForCausalLM(preset("tiny"))  # a model with an MTP block; vocabulary 256
    model.init_weights(torch.Generator().manual_seed(0))
    allowed = [t for t in ALLOWED if t < 256]
    params = [
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, allowed_token_ids=allowed),
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logit_bias={5: 3.0, 9: -100.0}),
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),  # speculates beside them
    ]
    prompts = [{"prompt_token_ids": [t % 256 for t in prompt]}] * 3
    spec = LLM(model.eval(), speculative_config={"method": "mtp", "num_speculative_tokens": 2},
               kv_cache_memory_bytes=8 << 20).generate(prompts, params)  # fmt: skip
    plain = LLM(model, kv_cache_memory_bytes=8 << 20).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    assert set(spec[0].outputs[0].token_ids) <= set(allowed) and 9 not in spec[1].outputs[0].token_ids


@pytest.mark.parametrize(
    "params, name",
    [
        (SamplingParams(logit_bias={CONFIG.vocab_size: 1.0}), "logit_bias"),
        (SamplingParams(allowed_token_ids=[3, CONFIG.vocab_size + 7]), "allowed_token_ids"),
    ],
)
def test_token_ids_outside_the_vocabulary_are_refused_by_name(models, prompt, params, name):
    llm = LLM(models[1])
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name}: token ids"):
        llm.generate({"prompt_token_ids": prompt}, params)
    assert not llm.engine.has_unfinished_requests()


def test_truncate_prompt_tokens_keeps_the_last_tokens(models, prompt):
    llm = LLM(models[1], max_model_len=20)
    greedy = {"temperature": 0.0, "max_tokens": 4, "ignore_eos": True}
    cut = llm.generate({"prompt_token_ids": prompt}, SamplingParams(truncate_prompt_tokens=5, **greedy))[0]
    alone = llm.generate({"prompt_token_ids": prompt[-5:]}, SamplingParams(**greedy))[0]
    assert cut.prompt_token_ids == prompt[-5:] and cut.outputs[0].token_ids == alone.outputs[0].token_ids
    long = prompt * 3  # 39 tokens: longer than the context of 20
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": long}, SamplingParams(**greedy))
    room = llm.generate({"prompt_token_ids": long}, SamplingParams(truncate_prompt_tokens=-1, **greedy))[0]
    assert room.prompt_token_ids == long[-16:] and len(room.outputs[0].token_ids) == 4  # 20 - max_tokens


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_bad_truncate_prompt_tokens_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=bad)


def test_banned_by_completes_a_sequence_only_after_its_head():
    from nemotron3.engine.sampler import banned_by

    seqs = [[7], [3, 4, 5], [9, 2]]
    assert banned_by(seqs, []) == [7]
    assert banned_by(seqs, [1, 3, 4]) == [5, 7]
    assert banned_by(seqs, [3, 4, 9]) == [2, 7]
    assert banned_by(seqs, [4, 3]) == [7]


def test_bad_words_change_the_greedy_choice_where_they_would_complete():
    """The default model: its greedy continuation's first word, banned, is not written; a two-token word is cut at
    its second token only; logprobs stay the model's raw ones."""
    from nemotron3.engine.sampler import bad_word_sequences

    llm = LLM("default", kv_cache_memory_bytes=32 << 20, max_num_seqs=4)
    tok = llm.get_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], enable_thinking=False)
    greedy = {"temperature": 0.0, "max_tokens": 6, "logprobs": 0}
    plain = llm.generate(prompt, SamplingParams(**greedy))[0].outputs[0]
    first = plain.token_ids[0]
    word = tok.decode([first]).strip()
    assert word and bad_word_sequences(tok, [word])[0] == tok.encode(word)
    banned = llm.generate(prompt, SamplingParams(bad_words=[word], **greedy))[0].outputs[0]
    assert all(seq[-1] not in banned.token_ids for seq in bad_word_sequences(tok, [word]) if len(seq) == 1)
    assert banned.token_ids[0] != first
    two = tok.decode(plain.token_ids[:2])
    assert tok.encode(two) == plain.token_ids[:2]  # a word the model writes in 2 tokens (digits: one token each)
    cut = llm.generate(prompt, SamplingParams(bad_words=[two], **greedy))[0].outputs[0]
    assert cut.token_ids[0] == first and cut.token_ids[1] != plain.token_ids[1]
    assert cut.logprobs[0][first].logprob == pytest.approx(plain.logprobs[0][first].logprob, abs=1e-6)


def test_bad_words_need_a_tokenizer_and_words(models, prompt):
    with pytest.raises(ValueError, match="bad_words"):
        LLM(models[1]).generate({"prompt_token_ids": prompt}, SamplingParams(bad_words=["x"]))
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=["  "])


def test_the_speculative_engine_keeps_bad_words_out_as_the_plain_one():
    """The default model has an MTP block: bad-word rows decode one token a step there, with the same tokens."""
    kwargs = {"kv_cache_memory_bytes": 32 << 20, "max_num_seqs": 4}
    plain = LLM("default", **kwargs)
    spec = LLM("default", speculative_config={"method": "mtp", "num_speculative_tokens": 2}, **kwargs)
    prompt = plain.get_tokenizer().apply_chat_template([{"role": "user", "content": "What is 2+3?"}],
                                                       enable_thinking=False)  # fmt: skip
    greedy = {"temperature": 0.0, "max_tokens": 6}
    params = [SamplingParams(bad_words=["11"], **greedy), SamplingParams(**greedy)]  # it writes "119" unbanned
    got = [o.outputs[0].token_ids for o in spec.generate([prompt, prompt], params)]
    want = [o.outputs[0].token_ids for o in plain.generate([prompt, prompt], params)]
    assert got == want and got[0] != got[1]
