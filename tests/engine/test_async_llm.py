"""AsyncLLM: concurrent requests share the engine, deltas add up, cancellation frees the cache."""

import asyncio

import pytest
import torch

from nemotron3 import SamplingParams
from nemotron3.config import preset
from nemotron3.engine.async_llm import AsyncLLM
from nemotron3.engine.engine import EngineConfig, LLMEngine
from nemotron3.engine.llm import LLM
from nemotron3.model import NemotronHForCausalLM

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def tiny():
    model = NemotronHForCausalLM(preset("tiny"))
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def test_concurrent_streams_match_offline_and_cancel_frees():
    model = tiny()
    prompts = [[5, 6, 7], [9] * 20, [3, 4]]
    expected = [o.outputs[0].token_ids for o in LLM(model).generate([{"prompt_token_ids": p} for p in prompts], GREEDY)]
    engine = LLMEngine(model, config=EngineConfig(max_num_batched_tokens=8))
    llm = AsyncLLM(engine)

    async def collect(p):
        tokens = []
        async for delta in llm.generate({"prompt_token_ids": p}, GREEDY):
            tokens += delta.outputs[0].token_ids
        return tokens

    async def cancelled():
        agen = llm.generate({"prompt_token_ids": [8] * 5}, SamplingParams(max_tokens=1000, ignore_eos=True))
        await agen.__anext__()
        await agen.aclose()  # a client going away

    async def main():
        results = await asyncio.gather(*(collect(p) for p in prompts), cancelled())
        with pytest.raises(ValueError, match="prompt is empty"):
            async for _ in llm.generate({"prompt_token_ids": []}):
                pass
        return results[:3]

    try:
        assert asyncio.run(main()) == expected
        assert not engine.has_unfinished_requests()
        assert len(engine.cache.free_slots) == engine.config.max_num_seqs
        assert len(engine.cache.free_blocks) == engine.cache.num_blocks
    finally:
        llm.shutdown()
