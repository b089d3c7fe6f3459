"""kv_cache_dtype="bfloat16": K/V pools in bf16, rounded as written and widened as read; attention math float32.

Reference: the float32 engine on the same model with K and V rounded to bf16 as the projections produce them.
It stores exactly the values the bf16 pool holds, so logprobs must agree to float32 summation noise. The
unrounded float32 engine differs visibly, which shows that the comparison can fail.
"""

import copy

import pytest
import torch

from nemotron3 import SamplingParams
from nemotron3.config import preset
from nemotron3.engine.engine import EngineConfig, LLMEngine
from nemotron3.engine.llm import LLM
from nemotron3.model import NemotronHForCausalLM
from nemotron3.model.attention import Attention
from tests.engine.test_engine import CONFIG, PROMPT_LENS, assert_pools_empty, wide_random_model

PARAMS = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=0)
MEM = 8 << 20


@pytest.fixture(scope="module")
def model():
    return wide_random_model(5)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(2)
    return [{"prompt_token_ids": torch.randint(3, CONFIG.vocab_size, (n,), generator=g).tolist()} for n in PROMPT_LENS]


def run(model, prompts, **options):
    """(tokens, chosen-token logprobs) per prompt."""
    outs = LLM(copy.deepcopy(model), kv_cache_memory_bytes=MEM, **options).generate(prompts, PARAMS)
    tokens = [o.outputs[0].token_ids for o in outs]
    logps = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
    return tokens, torch.tensor([x for row in logps for x in row], dtype=torch.float64)


def round_kv(monkeypatch) -> None:
    """From here on, Attention.qkv rounds K and V to bf16 (kept float32): what a bf16 pool stores."""
    qkv = Attention.qkv

    def rounded(self, hidden):
        q, k, v = qkv(self, hidden)
        return q, k.bfloat16().float(), v.bfloat16().float()

    monkeypatch.setattr(Attention, "qkv", rounded)


@pytest.mark.parametrize("budget", [512, 8])  # whole prompts, and chunked prefill over the bf16 pool
def test_bf16_pool_matches_float32_on_rounded_kv(model, prompts, budget, monkeypatch):
    tokens, logps = run(model, prompts, kv_cache_dtype="bfloat16", max_num_batched_tokens=budget)
    plain_tokens, plain = run(model, prompts, max_num_batched_tokens=budget)
    round_kv(monkeypatch)  # on the per-op path: decode programs (engine/decode_program.py) never call qkv
    ref_tokens, ref = run(model, prompts, max_num_batched_tokens=budget, enforce_eager=True)
    assert tokens == ref_tokens
    assert (logps - ref).abs().max() < 1e-4  # float32 noise (a different summation order in places)
    if tokens == plain_tokens:  # the rounding is visible in the logprobs even where the argmax is unchanged
        assert (plain - ref).abs().max() > 10 * (logps - ref).abs().max()


def test_bf16_pool_holds_twice_the_tokens_and_returns_every_block(model, prompts):
    f32 = LLMEngine(copy.deepcopy(model), config=EngineConfig(kv_cache_memory_bytes=MEM))
    b16 = LLMEngine(copy.deepcopy(model), config=EngineConfig(kv_cache_memory_bytes=MEM, kv_cache_dtype="bfloat16"))
    assert b16.cache.k.dtype == torch.bfloat16 and b16.cache.conv.dtype == torch.float32
    assert b16.cache.block_bytes * 2 == f32.cache.block_bytes
    assert b16.cache.num_blocks >= 2 * f32.cache.num_blocks - 1
    for i, p in enumerate(prompts):
        b16.add_request(str(i), p["prompt_token_ids"], PARAMS)
    while b16.has_unfinished_requests():
        b16.step()
    assert_pools_empty(b16)


def test_bad_kv_cache_dtype_is_rejected_before_the_model_changes(model):
    m = copy.deepcopy(model)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLMEngine(m, config=EngineConfig(kv_cache_memory_bytes=MEM, kv_cache_dtype="fp8", weight_dtype="bfloat16"))
    assert all(p.dtype == torch.float32 for p in m.parameters())  # not narrowed by the failed construction


def test_speculative_decoding_over_a_bf16_pool_is_lossless():
    """The MTP block's K/V planes live in the same bf16 pool; drafts verified against it change nothing."""
    model = NemotronHForCausalLM(preset("tiny"))
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval()
    g = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(3, 256, (n,), generator=g).tolist()} for n in PROMPT_LENS]
    opts = {"kv_cache_dtype": "bfloat16", "kv_cache_memory_bytes": MEM}
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    plain = LLM(copy.deepcopy(model), **opts).generate(prompts, greedy)
    spec = LLM(copy.deepcopy(model), speculative_config={"method": "mtp", "num_speculative_tokens": 2}, **opts)
    assert spec.engine.cache.k.dtype == torch.bfloat16
    drafted = spec.generate(prompts, greedy)
    assert [o.outputs[0].token_ids for o in drafted] == [o.outputs[0].token_ids for o in plain]
