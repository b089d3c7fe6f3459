"""LLM / LLMEngine: greedy token-identity with transformers, continuous batching, preemption, streaming."""

import pytest
import torch
from transformers import NemotronHConfig
from transformers import NemotronHForCausalLM as HFModel

from nemotron3 import SamplingParams
from nemotron3.config import ModelConfig, pattern_to_kinds
from nemotron3.engine.engine import EngineConfig, LLMEngine
from nemotron3.engine.llm import LLM
from nemotron3.model import NemotronHForCausalLM

CONFIG = ModelConfig(
    vocab_size=320, hidden_size=64, layers_block_type=pattern_to_kinds("ME*MEM*E"), num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, ssm_state_size=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=2,
    chunk_size=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=48, moe_latent_size=32, routed_scaling_factor=2.5,
    max_position_embeddings=512, dt_clamp="transformers",
)  # fmt: skip
PROMPT_LENS = (5, 17, 1, 33, 9)
NEW = 12


def hf_and_ours(seed: int) -> tuple[HFModel, NemotronHForCausalLM]:
    """transformers' NemotronH of CONFIG with random weights (torch seed `seed`), and ours holding the same."""
    torch.manual_seed(seed)
    hf_cfg = {k: v for k, v in CONFIG.to_dict().items() if k not in ("architectures", "model_type")}
    hf = HFModel(NemotronHConfig(**hf_cfg)).eval()
    ours = NemotronHForCausalLM(CONFIG).eval()
    state = {k.replace("model.", "backbone.", 1): v for k, v in hf.state_dict().items()}
    ours.load_state_dict(state)
    return hf, ours


@pytest.fixture(scope="module")
def models():
    return hf_and_ours(0)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, CONFIG.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def reference(models, prompts):
    """transformers' greedy generate, one prompt at a time (no padding), never stopping early."""
    hf, _ = models
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = hf.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            outs.append(ids[0, len(p) :].tolist())
    return outs


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)


@pytest.mark.parametrize(
    "options",
    [
        {"max_num_batched_tokens": 512},  # whole prompts in one step
        {"max_num_batched_tokens": 7},  # chunked prefill mixed with decodes
        {"max_num_batched_tokens": 64, "enable_chunked_prefill": False},
        {"max_num_seqs": 2, "max_num_batched_tokens": 16},  # a queue: requests join as others leave
    ],
)
def test_greedy_matches_transformers(models, prompts, reference, options):
    llm = LLM(models[1], **options)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert_pools_empty(llm.engine)


def test_requests_arriving_mid_flight(models, prompts, reference):
    engine = LLMEngine(models[1], config=EngineConfig(max_num_batched_tokens=8))
    done = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:  # a new request every third step
            i, p = pending.pop(0)
            engine.add_request(str(i), p, GREEDY)
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
        step += 1
    assert [done[i] for i in range(len(prompts))] == reference
    assert_pools_empty(engine)


def test_preemption_recomputes_and_matches(models, prompts, reference):
    # 6 K/V blocks of 8 tokens: not enough for all five sequences at once, so some are preempted.
    cfg = EngineConfig(block_size=8, max_num_seqs=5, max_model_len=48)
    engine = LLMEngine(models[1], config=cfg)
    engine.cache.free_blocks.take(engine.cache.num_blocks - 6)  # shrink the pool for the test
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out
    assert [done[i].outputs[0].token_ids for i in range(len(prompts))] == reference
    assert sum(o.metrics.num_preemptions for o in done.values()) > 0
    assert len(engine.cache.free_blocks) == 6 and len(engine.cache.free_slots) == 5


def wide_random_model(seed: int, config: ModelConfig = CONFIG) -> NemotronHForCausalLM:
    """A model of `config` (our CONFIG) with its matrices drawn wider than init (N(0, 0.08)), so that rounding
    them or the products (bf16 weights, a bf16 K/V cache, bf16 matmul products), or a row mixed up with
    another, moves the logits visibly."""
    torch.manual_seed(seed)
    m = NemotronHForCausalLM(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    return m


def assert_pools_empty(engine: LLMEngine) -> None:
    assert len(engine.cache.free_blocks) == engine.cache.num_blocks and not engine.cache.block_holders
    assert len(engine.cache.free_slots) == engine.config.max_num_seqs
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_stream_deltas_add_up_and_cancel_frees_cache(models, prompts, reference):
    llm = LLM(models[1])
    tokens = []
    for delta in llm.stream({"prompt_token_ids": prompts[3]}, GREEDY):
        tokens += delta.outputs[0].token_ids
    assert tokens == reference[3]
    stream = llm.stream({"prompt_token_ids": prompts[1]}, SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    next(stream), next(stream)
    stream.close()  # cancellation
    assert_pools_empty(llm.engine)


def test_sampling_n_seed_stop_and_logprobs(models, prompts):
    llm = LLM(models[1])
    params = SamplingParams(temperature=1.0, n=3, seed=11, max_tokens=8, logprobs=2, ignore_eos=True)
    a = llm.generate({"prompt_token_ids": prompts[0]}, params)[0]
    b = llm.generate({"prompt_token_ids": prompts[0]}, params)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]  # seeded: reproducible
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1  # the n samples differ
    c = a.outputs[0]
    assert len(c.logprobs) == 8 and all(c.token_ids[i] in c.logprobs[i] for i in range(8))
    assert abs(c.cumulative_logprob - sum(c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids))) < 1e-4
    stop_at = c.token_ids[3]
    first = c.token_ids.index(stop_at)
    d = llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(temperature=1.0, seed=11, max_tokens=8, stop_token_ids=[stop_at], ignore_eos=True))[0]
    assert d.outputs[0].token_ids == c.token_ids[: first + 1]
    assert d.outputs[0].finish_reason == "stop" and d.outputs[0].stop_reason == stop_at


def test_bad_requests_are_rejected_with_the_reason(models):
    llm = LLM(models[1], max_model_len=40)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate({"prompt_token_ids": []})
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [5] * 40})
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate({"prompt_token_ids": [5, 320]})
    with pytest.raises(ValueError, match="text prompt"):
        llm.generate("hello")
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate({"prompt_token_ids": [5]}, SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        llm.generate({"prompt_token_ids": [5]}, SamplingParams(stop=["\n"]))
    with pytest.raises(ValueError, match="unknown engine option"):
        LLM(models[1], max_batch=3)
    assert_pools_empty(llm.engine)  # nothing leaked by the rejected requests
    out = llm.generate({"prompt_token_ids": [5] * 30}, SamplingParams(max_tokens=None, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 10 and out.outputs[0].finish_reason == "length"  # stops at the context limit


def test_compiled_decode_matches_eager(models, prompts, reference):
    llm = LLM(models[1], compile=True, max_num_batched_tokens=16)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:3]], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == reference[:3]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE trained here on a few sentences (vocab < the test model's 320)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    return d


def test_text_prompts_detokenize_and_stop_strings(models, tokenizer_dir):
    llm = LLM(models[1], tokenizer=tokenizer_dir)
    tok = llm.get_tokenizer()
    assert tok.vocab_size <= 320 and tok.eos_token_id is not None
    base = llm.generate("the quick", SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    c = base.outputs[0]
    assert base.prompt == "the quick" and base.prompt_token_ids == tok.encode("the quick")
    assert c.text == tok.decode(c.token_ids)
    stop = next(c.text[i : i + 2] for i in range(4, len(c.text) - 2) if c.text[i : i + 2].strip())
    cut = llm.generate("the quick", SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert cut.text == c.text[: c.text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm.generate("the quick", SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop],
                                                   include_stop_str_in_output=True))[0].outputs[0]  # fmt: skip
    assert kept.text == c.text[: c.text.index(stop) + len(stop)]
    assert c.token_ids[: len(cut.token_ids)] == cut.token_ids  # greedy: the same tokens up to the stop
