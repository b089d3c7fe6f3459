"""DecodeProgram: a pure-decode step replayed as one native call gives the per-op path's logits bit for bit.

Both paths call the same kernels on the same values in the same order (engine/decode_program.py), so the
reference is the same engine with enforce_eager=True and the comparison is exact, on every step of staggered
requests (decode batches of 1 … 5 rows of different lengths, chunked prefill in between) and for every
option that changes the kernels' inputs: weight-only bf16, a bf16 K/V pool, dense MLP layers, Mamba biases.
"""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from nemotron3 import SamplingParams
from nemotron3.config import pattern_to_kinds
from nemotron3.engine.decode_program import DecodeProgram
from nemotron3.engine.engine import EngineConfig, LLMEngine
from nemotron3.engine.runner import Segment
from nemotron3.kernels import native
from nemotron3.model import NemotronHForCausalLM
from tests.engine.test_engine import CONFIG, PROMPT_LENS, assert_pools_empty

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")

PARAMS = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, logprobs=4)
MEM = 8 << 20


def make_model(config=CONFIG, seed: int = 3) -> NemotronHForCausalLM:
    model = NemotronHForCausalLM(config).eval()
    model.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-zero biases and norm weights, so that a wrong pointer cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def drain(engine: LLMEngine, program_steps: list | None = None, arrivals: list | None = None) -> dict:
    """Step until done, adding `arrivals` (id, prompt) one every other step; returns {id: (tokens, top-4
    logprobs)}. program_steps, if given, collects the row count of every step the program ran."""
    run = DecodeProgram.run

    def counted(self, segments):
        program_steps.append(len(segments))
        return run(self, segments)

    if program_steps is not None:
        DecodeProgram.run = counted
    try:
        pending, done, step = list(arrivals or []), {}, 0
        while pending or engine.has_unfinished_requests():
            if pending and step % 2 == 0:
                engine.add_request(*pending.pop(0), PARAMS)
            for out in engine.step():
                if out.finished:
                    o = out.outputs[0]
                    top = [sorted((t, lp.logprob) for t, lp in d.items()) for d in o.logprobs]
                    done[out.request_id] = (o.token_ids, top)
            step += 1
    finally:
        DecodeProgram.run = run
    assert_pools_empty(engine)
    return done


def generate(model, program_steps: list | None = None, **options) -> tuple[dict, LLMEngine]:
    """The test prompts arriving one every other step, drained (see `drain`)."""
    engine = LLMEngine(model, config=EngineConfig(kv_cache_memory_bytes=MEM, max_num_batched_tokens=16, **options))
    arrivals = [(str(i), p) for i, p in enumerate(prompts(model.config.vocab_size))]
    return drain(engine, program_steps, arrivals), engine


VARIANTS = {
    "float32": (CONFIG, {}),
    "bf16 weights": (CONFIG, {"weight_dtype": "bfloat16"}),
    "bf16 K/V": (CONFIG, {"kv_cache_dtype": "bfloat16"}),
    "MLP layers, Mamba biases": (
        dataclasses.replace(CONFIG, layers_block_type=pattern_to_kinds("M-*E-M*E"), use_bias=True), {}
    ),
    "Nano's MoE (no latent)": (dataclasses.replace(CONFIG, moe_latent_size=None), {}),
    "Nano's MoE, bf16 weights": (dataclasses.replace(CONFIG, moe_latent_size=None), {"weight_dtype": "bfloat16"}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_program_matches_the_per_op_path_bit_for_bit(variant):
    config, options = VARIANTS[variant]
    model = make_model(config)
    steps: list[int] = []
    got, engine = generate(copy.deepcopy(model), steps, **options)
    want, eager = generate(copy.deepcopy(model), **options, enforce_eager=True)
    assert got == want  # tokens and every logprob, exactly
    assert eager.runner._program is None and engine.runner._program is not None
    assert len(set(steps)) >= 3 and max(steps) <= native.LINEAR_MAX_ROWS  # batches of several sizes ran in it


def test_batches_wider_than_the_program_take_the_per_op_path():
    model = make_model()
    g = torch.Generator().manual_seed(4)
    wide = native.LINEAR_MAX_ROWS + 4
    requests = [torch.randint(3, 300, (3 + i,), generator=g).tolist() for i in range(wide)]
    results, steps = [], []
    for eager, counted in ((False, steps), (True, None)):
        config = EngineConfig(
            kv_cache_memory_bytes=MEM, max_num_seqs=wide, enforce_eager=eager, max_num_batched_tokens=8192
        )
        engine = LLMEngine(copy.deepcopy(model), config=config)
        for i, r in enumerate(requests):
            engine.add_request(str(i), r, PARAMS)
        results.append(drain(engine, counted))
    assert results[0] == results[1]
    assert steps == []  # more rows than the program takes in every decode step: never the program


def test_enforce_eager_and_compile_keep_the_per_op_path():
    model = make_model()
    for options in ({"enforce_eager": True}, {"compile": True}):
        engine = LLMEngine(copy.deepcopy(model), config=EngineConfig(kv_cache_memory_bytes=MEM, **options))
        assert engine.runner.decode_program(1) is None


def test_what_the_program_cannot_lay_out_runs_per_op():
    """Grouped routing (n_group > 1) and a hooked lm_head: the per-op path runs, and the hook sees every step."""
    grouped = make_model(dataclasses.replace(CONFIG, n_group=2, topk_group=1))
    got, engine = generate(copy.deepcopy(grouped))
    want, _ = generate(copy.deepcopy(grouped), enforce_eager=True)
    assert got == want and engine.runner._program is None and not engine.runner.use_program

    hooked = make_model()
    calls = []
    hooked.lm_head.register_forward_hook(lambda *_: calls.append(1))
    got, engine = generate(hooked)
    assert engine.runner._program is None and not engine.runner.use_program
    assert len(calls) >= PARAMS.max_tokens  # at least one call per decode step


def test_new_storage_is_laid_out_again_and_in_place_updates_are_seen():
    model = make_model()
    engine = LLMEngine(copy.deepcopy(model), config=EngineConfig(kv_cache_memory_bytes=MEM))
    eager = LLMEngine(copy.deepcopy(model), config=EngineConfig(kv_cache_memory_bytes=MEM, enforce_eager=True))

    def next_logprobs(e: LLMEngine) -> list:
        e.add_request("r", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=2))
        outs = []
        while e.has_unfinished_requests():
            outs += [o.outputs[0].logprobs for o in e.step() if o.finished]
        return outs

    assert next_logprobs(engine) == next_logprobs(eager)
    first = engine.runner._program
    with torch.no_grad():  # in place: same storage, the program reads the new values
        for e in (engine, eager):
            e.model.backbone.layers[1].mixer.experts.up_proj.mul_(1.5)
    assert next_logprobs(engine) == next_logprobs(eager)
    assert engine.runner._program is first
    g = torch.Generator().manual_seed(9)
    new = torch.randn(CONFIG.hidden_size, CONFIG.vocab_size, generator=g).t()  # K-major, as the runner stores it
    for e in (engine, eager):  # a new tensor: the old address must not be read again
        e.model.lm_head.weight = nn.Parameter(new.clone().t().contiguous().t())
    assert next_logprobs(engine) == next_logprobs(eager)
    assert engine.runner._program is not first and engine.runner._program is not None


def test_an_out_of_range_token_id_is_a_value_error():
    engine = LLMEngine(make_model(), config=EngineConfig(kv_cache_memory_bytes=MEM))
    seq = engine.cache.open()
    engine.cache.grow(seq, 1)
    with pytest.raises(ValueError, match="token id out of range"):
        engine.runner.step([Segment(seq, [CONFIG.vocab_size + 5], decode=True, want_logits=True)])
    assert seq.num_tokens == 0
    engine.cache.close(seq)
