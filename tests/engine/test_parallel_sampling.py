"""n > 1: the first sample prefills the prompt, the others fork its cache (HybridCache.fork, LLMEngine._fork)."""

import pytest
import torch

from nemotron3 import SamplingParams
from nemotron3.engine.engine import EngineConfig, LLMEngine
from tests.engine.test_engine import CONFIG, assert_pools_empty, hf_and_ours
from tests.engine.test_speculative import run

NEW = 10


@pytest.fixture(scope="module")
def models():
    return hf_and_ours(7)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(3, CONFIG.vocab_size, (29,), generator=torch.Generator().manual_seed(8)).tolist()


def counting(engine: LLMEngine) -> list[int]:
    """Prompt tokens the runner is fed, step by step (decode rows not counted)."""
    fed, step = [], engine.runner.step

    def counting_step(segments):
        fed.append(sum(len(s.tokens) for s in segments if not s.decode))
        return step(segments)

    engine.runner.step = counting_step
    return fed


def test_greedy_samples_fork_one_prefill_and_match_transformers(models, prompt):
    hf, ours = models
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    engine = LLMEngine(ours, config=EngineConfig(max_num_batched_tokens=11))  # the prompt in 3 chunks
    fed = counting(engine)
    engine.add_request("r", prompt, SamplingParams(n=4, temperature=0.0, max_tokens=NEW, ignore_eos=True))
    out = run(engine)["r"]
    assert [c.token_ids for c in out.outputs] == [want[0, len(prompt) :].tolist()] * 4
    assert sum(fed) == len(prompt)  # one prefill for the four samples
    assert_pools_empty(engine)


@pytest.mark.parametrize("options", [{}, {"logprobs": 2, "presence_penalty": 0.5, "top_k": 50}])
def test_forked_samples_draw_what_prefilled_ones_draw(models, prompt, options):
    """Seeded sampling: a forked sample starts from a bit-exact copy of the state its own prefill would compute, so
    its tokens are those of the engine that prefills every sample."""
    params = SamplingParams(n=3, temperature=1.0, max_tokens=NEW, ignore_eos=True, seed=11, **options)
    outs = []
    for fork in (True, False):
        engine = LLMEngine(models[1], config=EngineConfig(max_num_batched_tokens=512))
        engine.fork_samples = fork
        fed = counting(engine)
        engine.add_request("r", prompt, params)
        outs.append(run(engine)["r"])
        assert sum(fed) == len(prompt) * (1 if fork else 3)
        assert_pools_empty(engine)
    forked, prefilled = outs
    assert [c.token_ids for c in forked.outputs] == [c.token_ids for c in prefilled.outputs]
    assert len({tuple(c.token_ids) for c in forked.outputs}) > 1  # the samples differ from one another
    if "logprobs" in options:
        for a, b in zip(forked.outputs, prefilled.outputs):
            assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-4)


def test_samples_without_room_to_fork_prefill_themselves(models, prompt):
    cfg = EngineConfig(block_size=8, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=64)
    engine = LLMEngine(models[1], config=cfg)
    # 32 K/V tokens: the first sample's prompt and 3 new tokens fill 4 blocks, leaving none for a fork's copy of
    # the partial last block (its 3 full blocks it would share)
    engine.cache.free_blocks.take(engine.cache.num_blocks - 4)
    fed = counting(engine)
    engine.add_request("r", prompt, SamplingParams(n=2, temperature=0.0, max_tokens=4, ignore_eos=True))
    out = run(engine)["r"]
    assert out.outputs[0].token_ids == out.outputs[1].token_ids and sum(fed) == 2 * len(prompt)
    assert len(engine.cache.free_blocks) == 4 and len(engine.cache.free_slots) == 4


def test_aborting_while_samples_wait_for_the_prompt_frees_everything(models, prompt):
    engine = LLMEngine(models[1], config=EngineConfig(max_num_batched_tokens=8))
    engine.add_request("r", prompt, SamplingParams(n=3, max_tokens=4))
    engine.step()  # the first sample is mid-prompt; the others wait for it
    out = engine.abort("r")
    assert [c.finish_reason for c in out.outputs] == ["abort"] * 3
    assert not engine.has_unfinished_requests()
    assert_pools_empty(engine)


def test_a_fork_shares_full_blocks_and_copies_state_and_the_last_block(models, prompt):
    """Without a prefix cache a fork holds its parent's 3 full blocks (29 tokens, blocks of 8) and copies the
    partial 4th; the shared blocks go back to the pool only when both have let go."""
    engine = LLMEngine(models[1], config=EngineConfig(block_size=8))
    cache = engine.cache
    engine.add_request("s", prompt, SamplingParams(max_tokens=2))
    engine.step()  # the prompt is in the cache
    parent = engine.requests["s"].seqs[0].cache
    free = len(cache.free_blocks)
    child = cache.fork(parent)
    assert child.slot != parent.slot and child.blocks[:3] == parent.blocks[:3]
    assert child.blocks[3] not in parent.blocks and len(cache.free_blocks) == free - 1
    assert cache.block_holders == {b: 2 for b in parent.blocks[:3]}
    assert child.num_tokens == parent.num_tokens and len(child.blocks) == -(-parent.num_tokens // 8)
    for pool in (cache.conv, cache.ssm):
        assert torch.equal(pool[:, child.slot], pool[:, parent.slot])
    mine, theirs = (
        cache.token_positions(child, 0, parent.num_tokens),
        cache.token_positions(parent, 0, parent.num_tokens),
    )
    assert torch.equal(cache.k[:, :, mine], cache.k[:, :, theirs]) and torch.equal(
        cache.v[:, :, mine], cache.v[:, :, theirs]
    )
    assert cache.k[:, :, theirs].abs().sum() > 0
    grandchild = cache.fork(child)  # three holders now
    assert cache.block_holders == {b: 3 for b in parent.blocks[:3]} and grandchild.blocks[:3] == parent.blocks[:3]
    cache.close(child)
    cache.close(grandchild)
    assert not cache.block_holders and len(cache.free_blocks) == free


def fork_run(models, prompt, plan: list[tuple[str, str | None, list[int] | None]], abort: str | None = None):
    """Requests (id, fork_of, prompt or None for the shared one), seeded; `abort` is cancelled after one step."""
    engine = LLMEngine(models[1], config=EngineConfig(max_num_batched_tokens=8))  # the prompt takes 4 steps
    fed = counting(engine)
    for i, (rid, fork_of, own) in enumerate(plan):
        params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=40 + i)
        engine.add_request(rid, own or prompt, params, fork_of=fork_of)
    done = {}
    if abort is not None:
        for out in engine.step():
            done[out.request_id] = out
        engine.abort(abort)
    done.update(run(engine))
    assert_pools_empty(engine)
    return done, sum(fed)


def test_requests_fork_from_another_with_the_same_prompt(models, prompt):
    """A server's n samples are n requests: fork_of lets them share the first one's prefill, chains included, and
    each draws what it draws when it prefills by itself."""
    plan = [("a", None, None), ("b", "a", None), ("c", "b", None), ("d", "a", None)]
    forked, fed = fork_run(models, prompt, plan)
    alone, fed_alone = fork_run(models, prompt, [(rid, None, None) for rid, _, _ in plan])
    assert fed == len(prompt) and fed_alone == 4 * len(prompt)
    tokens = [{r: o.outputs[0].token_ids for r, o in outs.items()} for outs in (forked, alone)]
    assert tokens[0] == tokens[1]


def test_fork_of_another_prompt_or_an_unknown_request_prefills_as_usual(models, prompt):
    other = prompt[::-1]
    done, fed = fork_run(models, prompt, [("a", None, None), ("b", "a", other), ("c", "nobody", None)])
    assert fed == 3 * len(prompt) and set(done) == {"a", "b", "c"}


@pytest.mark.parametrize("abort", ["a", "b"])
def test_aborting_either_side_of_a_waiting_fork_loses_nothing(models, prompt, abort):
    """The source cancelled: the waiting request prefills by itself. The waiting one cancelled: the source goes on."""
    done, fed = fork_run(models, prompt, [("a", None, None), ("b", "a", None)], abort=abort)
    kept = "b" if abort == "a" else "a"
    assert done[kept].finished and len(done[kept].outputs[0].token_ids) == 6
    assert fed == (8 + len(prompt) if abort == "a" else len(prompt))  # a's first chunk, then b's own prefill


def test_a_request_that_scores_its_prompt_prefills_it_even_with_fork_of(models, prompt):
    engine = LLMEngine(models[1], config=EngineConfig(max_num_batched_tokens=64))
    fed = counting(engine)
    engine.add_request("a", prompt, SamplingParams(max_tokens=2))
    engine.add_request("b", prompt, SamplingParams(max_tokens=2, prompt_logprobs=1), fork_of="a")
    out = run(engine)["b"]
    assert sum(fed) == 2 * len(prompt) and len(out.prompt_logprobs) == len(prompt)


def test_samples_share_the_prompts_blocks_in_a_pool_too_small_for_copies(models, prompt):
    """4 samples of a 29-token prompt (blocks of 8), 3 new tokens each: shared, they need 3 + 4 blocks; copied,
    16. With 8 blocks free they all fork from one prefill and draw what they draw in a roomy pool."""
    params = SamplingParams(n=4, temperature=1.0, max_tokens=3, ignore_eos=True, seed=11)
    cfg = EngineConfig(block_size=8, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=64)
    roomy = LLMEngine(models[1], config=cfg)
    roomy.add_request("r", prompt, params)
    expected = [o.token_ids for o in run(roomy)["r"].outputs]
    engine = LLMEngine(models[1], config=cfg)
    engine.cache.free_blocks.take(engine.cache.num_blocks - 8)
    fed = counting(engine)
    engine.add_request("r", prompt, params)
    out = run(engine)["r"]
    assert [o.token_ids for o in out.outputs] == expected and sum(fed) == len(prompt)
    assert len(engine.cache.free_blocks) == 8 and not engine.cache.block_holders
