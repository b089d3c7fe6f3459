"""matmul_precision (torch.set_float32_matmul_precision's names): prefill GEMMs on AMX tiles, or AVX512-BF16 dot
products ("medium" only), where the CPU has them.

Reference: the same model under "highest" (float32 GEMMs). "high" differs from it by the bf16 split's ~1e-5 of
|x|·|w| per product (tests/kernels/test_amx.py), which moves a chosen token's logprob by far less than 1e-3 here;
"medium" (bfloat16 inputs, ~4e-3) moves it visibly, which shows the comparison can fail.
"""

import copy

import pytest
import torch

from nemotron3 import SamplingParams
from nemotron3.engine.engine import EngineConfig, LLMEngine
from nemotron3.engine.llm import LLM
from nemotron3.kernels import native
from tests.engine.test_engine import CONFIG, wide_random_model

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)
LENS = (300, 160, 40)  # two prompts long enough for the AMX path (AMX_MIN_ROWS), one that stays float32


@pytest.fixture(scope="module")
def model():
    return wide_random_model(9)


def run(model, precision: str):
    g = torch.Generator().manual_seed(2)
    prompts = [{"prompt_token_ids": torch.randint(3, CONFIG.vocab_size, (n,), generator=g).tolist()} for n in LENS]
    llm = LLM(copy.deepcopy(model), kv_cache_memory_bytes=8 << 20, max_num_batched_tokens=1024,
              matmul_precision=precision)  # fmt: skip
    outs = llm.generate(prompts, PARAMS)
    tokens = [o.outputs[0].token_ids for o in outs]
    logps = [lp[t].logprob for o in outs for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
    return tokens, torch.tensor(logps, dtype=torch.float64)


def test_bad_matmul_precision_is_rejected(model):
    with pytest.raises(ValueError, match="matmul_precision"):
        LLMEngine(copy.deepcopy(model), config=EngineConfig(kv_cache_memory_bytes=8 << 20, matmul_precision="tf32"))


def bf16_calls(monkeypatch) -> list[bool]:
    """Records, call by call, whether native.matmul_bf16 ran (True) or declined (False)."""
    calls, product = [], native.matmul_bf16

    def counted(x, *args):
        out = product(x, *args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(native, "matmul_bf16", counted)
    return calls


@pytest.mark.skipif(not native.amx_available(), reason="no AMX here: every precision runs float32 GEMMs")
def test_high_tracks_float32_and_medium_visibly_does_not(model, monkeypatch):
    tokens, logps = run(model, "highest")
    calls = bf16_calls(monkeypatch)
    high_tokens, high_logps = run(model, "high")
    assert sum(calls) > 0  # the long prompts' GEMMs took the AMX path
    assert high_tokens == tokens
    assert (high_logps - logps).abs().max() < 1e-3
    _, medium_logps = run(model, "medium")
    assert (medium_logps - logps).abs().max() > 10 * (high_logps - logps).abs().max()


@pytest.mark.skipif(not native.bf16_dot_available(), reason="no AVX512-BF16 here: every precision runs float32")
def test_without_amx_medium_runs_bf16_dot_products_and_high_stays_float32(model, monkeypatch):
    """Without AMX (an AMX CPU is made to go without), "medium" takes the AVX512-BF16 products for the long
    prompts' GEMMs and moves the logprobs by bf16 rounding; "high", whose three products would cost more than
    float32 there, is float32 bit for bit. (The largest logprob change was 3e-3 here; 0.05 leaves room.)"""
    native.allow_amx(False)
    try:
        tokens, logps = run(model, "highest")
        calls = bf16_calls(monkeypatch)
        high_tokens, high_logps = run(model, "high")
        assert calls and not any(calls)
        assert high_tokens == tokens and torch.equal(high_logps, logps)
        _, medium_logps = run(model, "medium")
        assert any(calls)
        diff = (medium_logps - logps).abs().max().item()
        assert 1e-5 < diff < 0.05, diff
    finally:
        native.allow_amx(True)
