"""SamplingParams.prompt_logprobs: every prompt token scored by the engine, against transformers' forward."""

import pytest
import torch

from nemotron3 import SamplingParams
from nemotron3.engine.engine import EngineConfig, LLMEngine
from nemotron3.engine.llm import LLM
from tests.engine.test_engine import CONFIG, assert_pools_empty, hf_and_ours
from tests.engine.test_speculative import run

PROMPT_LENS = (5, 17, 1, 33, 9)
NEW = 6
K = 3
# Both sides run float32 (transformers' grouped expert GEMM has no float64) through 8 layers of width 64, in
# different orders: the engine's chunked scan, fused projections and native kernels against transformers' ops.
# Log-probs over a 320-token vocabulary are O(6) and float32 carries ~7 digits, so ~1e-5 absolute is the rounding
# floor of each side; 2e-4 leaves room for the differently ordered sums without admitting a wrong row (a wrong
# position or token moves a logprob by O(1)).
ATOL = 2e-4


@pytest.fixture(scope="module")
def models():
    return hf_and_ours(3)  # weights of their own, not test_engine's


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(4)
    return [torch.randint(3, CONFIG.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def reference(models, prompts):
    """Per prompt: the log-softmax at every position [n, V] of transformers' forward."""
    hf, _ = models
    with torch.no_grad():
        return [hf(torch.tensor([p])).logits[0].log_softmax(-1) for p in prompts]


def check(prompt: list[int], got: list, ref: torch.Tensor, k: int) -> None:
    """got: RequestOutput.prompt_logprobs; ref: log-softmax [len(prompt), V] (row p predicts token p + 1)."""
    assert len(got) == len(prompt) and got[0] is None
    for p, entry in enumerate(got[1:]):
        row, tok = ref[p], prompt[p + 1]
        assert entry[tok].logprob == pytest.approx(row[tok].item(), abs=ATOL)
        assert entry[tok].rank in ranks(row, row[tok])
        assert len(entry) in (k, k + 1)  # the top k, and the prompt token unless it is among them
        kth = row.topk(k).values[-1] if k else None
        for t, v in entry.items():
            assert v.logprob == pytest.approx(row[t].item(), abs=ATOL)
            if t != tok:  # a top-k token: among the reference's k best, ranked as there (up to near-ties)
                assert row[t] >= kth - ATOL and v.rank in ranks(row, row[t]) and v.rank <= k


def ranks(row: torch.Tensor, value: torch.Tensor) -> range:
    """The ranks a token of logprob `value` may take in `row` when values within ATOL of it may order either way."""
    return range(int((row > value + ATOL).sum()) + 1, int((row > value - ATOL).sum()) + 2)


@pytest.mark.parametrize(
    "options",
    [
        {"max_num_batched_tokens": 512},  # whole prompts in one step
        {"max_num_batched_tokens": 7},  # chunked prefill, mixed with other requests' decodes
        {"max_num_seqs": 2, "max_num_batched_tokens": 16},
    ],
)
def test_prompt_logprobs_match_transformers(models, prompts, reference, options):
    llm = LLM(models[1], **options)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, prompt_logprobs=K)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for p, out, ref in zip(prompts, outs, reference):
        check(p, out.prompt_logprobs, ref, K)
        # scoring the prompt leaves generation as it was
        assert (
            out.outputs[0].token_ids == LLM(models[1]).generate({"prompt_token_ids": p}, params)[0].outputs[0].token_ids
        )
    assert_pools_empty(llm.engine)


def test_zero_asks_for_the_prompt_tokens_alone_and_none_leaves_them_out(models, prompts, reference):
    llm = LLM(models[1], max_num_batched_tokens=8)
    out, plain = llm.generate(
        [{"prompt_token_ids": prompts[3]}] * 2,
        [SamplingParams(max_tokens=2, prompt_logprobs=0), SamplingParams(max_tokens=2)],
    )
    assert plain.prompt_logprobs is None
    check(prompts[3], out.prompt_logprobs, reference[3], 0)
    assert all(len(e) == 1 for e in out.prompt_logprobs[1:])


def test_prompt_logprobs_survive_preemptions_under_pressure(models, prompts, reference):
    cfg = EngineConfig(block_size=8, max_num_seqs=5, max_model_len=48, max_num_batched_tokens=12)
    engine = LLMEngine(models[1], config=cfg)
    engine.cache.free_blocks.take(engine.cache.num_blocks - 6)  # 48 K/V tokens for 5 sequences: preemptions
    for i, p in enumerate(prompts):
        params = SamplingParams(n=2 if i == 3 else 1, max_tokens=NEW, ignore_eos=True, prompt_logprobs=K, seed=i)
        engine.add_request(str(i), p, params)
    done = run(engine)
    assert sum(o.metrics.num_preemptions for o in done.values()) > 0
    for i, p in enumerate(prompts):
        check(p, done[str(i)].prompt_logprobs, reference[i], K)
    assert len(engine.cache.free_blocks) == 6 and len(engine.cache.free_slots) == 5


def counting_records(engine: LLMEngine) -> list[int]:
    """Hook the engine's prompt-logprob recording; the list gets how many new logprobs each call added."""
    added, record = [], engine._record_prompt_logprobs

    def counting_record(seq, start, logits):
        before = len(engine.requests[seq.request_id].prompt_logprobs)
        record(seq, start, logits)
        added.append(len(engine.requests[seq.request_id].prompt_logprobs) - before)

    engine._record_prompt_logprobs = counting_record
    return added


@pytest.mark.parametrize("steps", [2, 7])  # preempted mid-prompt (16 of 33 scored), or after it and 2 tokens
def test_a_recompute_after_preemption_scores_only_what_is_missing(models, prompts, reference, steps):
    engine = LLMEngine(models[1], config=EngineConfig(max_num_batched_tokens=7))
    added = counting_records(engine)
    engine.add_request("r", prompts[3], SamplingParams(max_tokens=NEW, ignore_eos=True, prompt_logprobs=K))
    for _ in range(steps):
        engine.step()
    engine.scheduler._preempt(engine.scheduler.running[0])
    out = run(engine)["r"]
    assert out.metrics.num_preemptions == 1
    check(prompts[3], out.prompt_logprobs, reference[3], K)
    assert min(added) > 0 and sum(added) == len(prompts[3]) - 1


def test_only_the_first_of_n_samples_scores_the_prompt(models, prompts, reference):
    engine = LLMEngine(models[1], config=EngineConfig(max_num_batched_tokens=512))
    added = counting_records(engine)
    engine.add_request("r", prompts[1], SamplingParams(n=3, max_tokens=2, seed=0, prompt_logprobs=K))
    check(prompts[1], run(engine)["r"].prompt_logprobs, reference[1], K)
    assert added == [len(prompts[1]) - 1]  # the three samples prefill in one step; one of them scores


def test_a_stream_carries_them_once_in_its_first_delta(models, prompts, reference):
    llm = LLM(models[1], max_num_batched_tokens=8)
    deltas = list(llm.stream({"prompt_token_ids": prompts[1]}, SamplingParams(max_tokens=4, prompt_logprobs=1)))
    assert deltas[0].prompt_logprobs is not None and all(d.prompt_logprobs is None for d in deltas[1:])
    check(prompts[1], deltas[0].prompt_logprobs, reference[1], 1)


def test_sampled_tokens_carry_their_rank(models, prompts):
    out = LLM(models[1]).generate({"prompt_token_ids": prompts[1]}, SamplingParams(max_tokens=8, logprobs=2, seed=5))[0]
    hf, _ = models
    ids = prompts[1] + out.outputs[0].token_ids
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, len(prompts[1]) - 1 : -1].log_softmax(-1)
    for row, tok, entry in zip(ref, out.outputs[0].token_ids, out.outputs[0].logprobs):
        assert entry[tok].rank in ranks(row, row[tok])
        assert entry[tok].logprob == pytest.approx(row[tok].item(), abs=ATOL)


@pytest.mark.parametrize("bad", [-1, 1.5, "3"])
def test_bad_prompt_logprobs_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=bad)
