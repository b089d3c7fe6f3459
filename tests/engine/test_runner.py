"""ModelRunner: the blocks after the last cache-holding one run on the sampling rows only (run_layers `rows`)."""

import pytest
import torch

from nemotron3 import SamplingParams
from nemotron3.config import ModelConfig, pattern_to_kinds
from nemotron3.engine.llm import LLM
from nemotron3.kernels import native
from nemotron3.model import NemotronHForCausalLM
from tests.engine.test_engine import wide_random_model

PROMPT_LENS = (13, 30, 1, 21)


def model_with(pattern: str, seed: int = 0) -> NemotronHForCausalLM:
    """A small random model of `pattern` with wide matrices (test_engine.wide_random_model)."""
    config = ModelConfig(
        vocab_size=256, hidden_size=64, layers_block_type=pattern_to_kinds(pattern), num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, ssm_state_size=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=2,
        chunk_size=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48, moe_latent_size=32, intermediate_size=96,
        max_position_embeddings=256,
    )  # fmt: skip
    return wide_random_model(seed, config)


def generate(llm: LLM, prompts: list[list[int]]):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0] for o in outs]


@pytest.mark.parametrize(
    "pattern, cut",
    [("MEM*EME", 5), ("ME*MEM*E", 6), ("M*E-", 1), ("*M-E-", 1), ("E-", -1)],
)
@pytest.mark.parametrize("budget", [512, 7])  # whole prompts in one step; chunks mixed with decodes
def test_rows_after_the_last_cached_block_give_the_same_logits(pattern, cut, budget):
    """Cut and uncut runners agree token for token and in their log-probabilities (1e-5: the two run the
    same float32 math, on fewer rows, so only MKL's blocking for a different row count may differ)."""
    model = model_with(pattern)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]
    cut_llm, full_llm = (LLM(model, max_num_batched_tokens=budget, max_num_seqs=4) for _ in range(2))
    assert cut_llm.engine.runner.last_cached_layer == cut
    full_llm.engine.runner.last_cached_layer = None  # run every block over every row
    got, want = generate(cut_llm, prompts), generate(full_llm, prompts)
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs):
            assert la.keys() == lb.keys()
            for t in la:
                assert la[t].logprob == pytest.approx(lb[t].logprob, abs=1e-5)


@pytest.mark.parametrize("budget", [512, 7])
def test_the_cut_without_native_kernels(budget, monkeypatch):
    """With the native kernels off, the cut Mamba layer's chunks take the torch scan over every row (z unset in
    the rows the cut leaves out) and keep the sampling rows."""
    monkeypatch.setenv("NEMOTRON3_NATIVE", "0")
    native.reset()
    try:
        test_rows_after_the_last_cached_block_give_the_same_logits("MEM*EME", 5, budget)
    finally:
        monkeypatch.delenv("NEMOTRON3_NATIVE")
        native.reset()


def test_a_mamba_step_of_another_runner_is_cut_after_it():
    """run_layers with a Mamba callback other than the runner's own (as the speculative runner passes) keeps the
    callback's whole output and cuts it to the rows afterwards: same tokens and log-probs as the uncut runner."""
    model = model_with("MEM*EME")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]
    cut_llm, full_llm = (LLM(model, max_num_batched_tokens=7, max_num_seqs=4) for _ in range(2))
    runner, calls = cut_llm.engine.runner, []
    run_layers = runner.run_layers

    def foreign(segments, n_dec, mamba, rows=None):
        def step(*args):
            calls.append(args[0])
            return mamba(*args)

        return run_layers(segments, n_dec, step, rows)

    runner.run_layers = foreign
    full_llm.engine.runner.last_cached_layer = None
    got, want = generate(cut_llm, prompts), generate(full_llm, prompts)
    assert 5 in calls  # the cut layer (index 5) ran through the foreign callback
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs):
            assert all(la[t].logprob == pytest.approx(lb[t].logprob, abs=1e-5) for t in la)


def test_the_last_block_sees_only_the_sampling_rows():
    """A 30-token prompt prefilled in chunks of 8, the last block's mixer and the first one's in_proj hooked: the
    chunks that do not sample never reach the last block, the final chunk brings it one row; the first block
    sees every row of every chunk."""
    model = model_with("MEM*EME")
    seen: dict[str, list[int]] = {"first": [], "last": []}
    hooked = {"first": model.backbone.layers[0].mixer.in_proj, "last": model.backbone.layers[6].mixer}
    for name, module in hooked.items():
        module.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].shape[-2]))
    llm = LLM(model, max_num_batched_tokens=8, enforce_eager=True)
    llm.generate([{"prompt_token_ids": list(range(1, 31))}], SamplingParams(temperature=0.0, max_tokens=2))
    assert seen["last"] == [1, 1]  # the prompt's last token, then the one decode step
    assert seen["first"] == [8, 8, 8, 6, 1]
