"""Weight-only bf16 (EngineConfig.weight_dtype="bfloat16"): bf16 matrices, float32 everything else.

The engine must compute exactly the float32 model whose matrices are rounded to bf16, so transformers in
float32 on those rounded weights is the reference: greedy tokens must be identical, through chunked prefill,
batched decode and the native kernels (which widen each bf16 weight exactly and accumulate in float32).
"""

import copy

import pytest
import torch
from transformers import NemotronHConfig
from transformers import NemotronHForCausalLM as HFModel

from nemotron3 import SamplingParams
from nemotron3.engine.engine import EngineConfig, LLMEngine
from nemotron3.engine.llm import LLM
from nemotron3.engine.runner import narrow_weight_storage
from nemotron3.model import NemotronHForCausalLM
from tests.engine.test_engine import CONFIG, NEW, PROMPT_LENS, wide_random_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def ours():
    return wide_random_model(3)


@pytest.fixture(scope="module")
def rounded_reference(ours):
    """transformers' greedy generate (float32) on the bf16-rounded matrices, one prompt at a time."""
    narrowed = copy.deepcopy(ours)
    narrow_weight_storage(narrowed, torch.bfloat16)
    hf_cfg = {k: v for k, v in CONFIG.to_dict().items() if k not in ("architectures", "model_type")}
    hf = HFModel(NemotronHConfig(**hf_cfg)).eval()
    state = {k.replace("backbone.", "model.", 1): v.float() for k, v in narrowed.state_dict().items()}
    hf.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, CONFIG.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = hf.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            outs.append(ids[0, len(p) :].tolist())
    return prompts, outs


def test_narrowing_keeps_everything_but_the_matrices_float32(ours):
    model = copy.deepcopy(ours)
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    n = narrow_weight_storage(model, torch.bfloat16)
    assert n > 0
    for name, p in model.named_parameters():
        matrix = name.endswith(("proj.weight", "lm_head.weight", "gate.weight", "up_proj", "down_proj"))
        assert p.dtype == (torch.bfloat16 if matrix else torch.float32), name
    assert model.dtype == torch.float32  # the activations' dtype, which sizes the cache
    after = sum(p.numel() * p.element_size() for p in model.parameters())
    assert after < 0.7 * before


@pytest.mark.parametrize("options", [{"max_num_batched_tokens": 512}, {"max_num_batched_tokens": 8}])
def test_greedy_matches_transformers_on_rounded_weights(ours, rounded_reference, options):
    prompts, reference = rounded_reference
    llm = LLM(copy.deepcopy(ours), weight_dtype="bfloat16", **options)
    assert llm.engine.cache.k.dtype == torch.float32
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == reference


def test_rounding_changes_the_float32_tokens(ours, rounded_reference):
    """The test above could not pass by accident of unchanged weights: the unrounded model decodes differently."""
    prompts, reference = rounded_reference
    outs = LLM(copy.deepcopy(ours)).generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] != reference


def test_bad_weight_dtype_is_rejected(ours):
    with pytest.raises(ValueError, match="weight_dtype"):
        LLMEngine(copy.deepcopy(ours), config=EngineConfig(weight_dtype="int8"))
    with pytest.raises(ValueError, match="weight_dtype"):
        LLMEngine(copy.deepcopy(ours).to(torch.bfloat16), config=EngineConfig(weight_dtype="float32"))


def test_speculative_decoding_with_bf16_weights_is_lossless():
    """MTP drafts verified by the narrowed target: the same greedy tokens as plain decoding of that target
    (the MTP block's own matrices are narrowed too)."""
    from nemotron3.config import preset

    torch.manual_seed(0)
    model = NemotronHForCausalLM(preset("tiny"))
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval()
    g = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(3, 256, (n,), generator=g).tolist()} for n in PROMPT_LENS]
    opts = {"weight_dtype": "bfloat16", "kv_cache_memory_bytes": 8 << 20}
    plain = LLM(copy.deepcopy(model), **opts).generate(prompts, GREEDY)
    spec = LLM(copy.deepcopy(model), speculative_config={"method": "mtp", "num_speculative_tokens": 2}, **opts)
    drafted = spec.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in drafted] == [o.outputs[0].token_ids for o in plain]
    assert spec.engine.model.mtp.layers[0].eh_proj.weight.dtype == torch.bfloat16
