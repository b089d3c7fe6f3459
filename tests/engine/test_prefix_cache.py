"""Automatic prefix caching (engine/prefix_cache.py, HybridCache.commit/open, LLMEngine._prompt_snapshots): a prompt
that starts with cached tokens skips them, and the tokens are those of transformers / the engine without caching."""

import random

import pytest
import torch

from nemotron3 import SamplingParams
from nemotron3.config import pattern_to_kinds
from nemotron3.engine.cache import CacheConfig, HybridCache
from nemotron3.engine.engine import EngineConfig, LLMEngine
from nemotron3.engine.prefix_cache import PrefixCache
from nemotron3.engine.runner import Segment
from nemotron3.model import NemotronHForCausalLM
from tests.engine.test_engine import CONFIG, hf_and_ours
from tests.engine.test_parallel_sampling import counting
from tests.engine.test_speculative import run

NEW = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def models():
    return hf_and_ours(0)


def reference(hf, prompt: list[int], new: int = NEW) -> list[int]:
    with torch.no_grad():
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return ids[0, len(prompt) :].tolist()


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, CONFIG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def caching_engine(model, **options) -> LLMEngine:
    config = {"enable_prefix_caching": True, "block_size": 4, "max_num_batched_tokens": 7, "max_num_seqs": 4}
    return LLMEngine(model, config=EngineConfig(**{**config, **options}))


def generate(engine: LLMEngine, rid: str, prompt: list[int], params: SamplingParams = GREEDY):
    engine.add_request(rid, prompt, params)
    return run(engine)[rid]


def shrink(engine: LLMEngine, blocks: int) -> int:
    """Leave `blocks` K/V blocks usable (the test holds the others); returns that number."""
    engine.cache.free_blocks.take(len(engine.cache.free_blocks) - blocks)
    return blocks


def assert_cache_released(engine: LLMEngine, usable: int | None = None) -> None:
    """Nothing held once every request finished, and nothing left after reset_prefix_cache."""
    cache = engine.cache
    usable = cache.num_blocks if usable is None else usable
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert len(cache.free_slots) == engine.config.max_num_seqs
    assert cache.available_blocks() == usable
    assert engine.reset_prefix_cache()
    assert len(cache.free_blocks) == usable
    assert len(cache.free_snapshots) == cache.free_snapshots.capacity
    assert cache.prefix.num_nodes == 0 and cache.prefix.evictable_blocks == 0


def test_repeated_extended_and_shared_prompts_skip_cached_tokens(models):
    """Block 4, chunks of 7: the snapshot points fall inside chunks. Each output equals transformers'."""
    hf, ours = models
    engine = caching_engine(ours)
    fed = counting(engine)
    a = tokens(45, 1)
    first = generate(engine, "a", a)
    assert first.num_cached_tokens == 0 and first.outputs[0].token_ids == reference(hf, a)

    fed.clear()
    again = generate(engine, "a2", a)  # a resubmission resumes at the prompt's last block end (44)
    assert again.num_cached_tokens == 44 and sum(fed) == 1
    assert again.outputs[0].token_ids == first.outputs[0].token_ids

    turn = a + first.outputs[0].token_ids + tokens(5, 2)  # the next turn resumes where decoding last saved (56)
    fed.clear()
    out = generate(engine, "b", turn)
    assert out.num_cached_tokens == 56 and sum(fed) == len(turn) - 56
    assert out.outputs[0].token_ids == reference(hf, turn)

    # two prompts sharing a 22-token "system prompt": the first finds K/V blocks but no state at their end (20)
    # and saves one there; the second resumes from it
    c, d = a[:22] + tokens(7, 3), a[:22] + tokens(8, 4)
    assert generate(engine, "c", c).num_cached_tokens == 0
    out = generate(engine, "d", d)
    assert out.num_cached_tokens == 20 and out.outputs[0].token_ids == reference(hf, d)
    assert_cache_released(engine)


def test_without_prefix_caching_nothing_is_cached(models):
    engine = LLMEngine(models[1], config=EngineConfig(block_size=4))
    a = tokens(30, 5)
    generate(engine, "a", a)
    out = generate(engine, "b", a)
    assert out.num_cached_tokens == 0 and engine.cache.prefix is None
    assert len(engine.cache.free_blocks) == engine.cache.num_blocks


@pytest.mark.parametrize("block_size", [4, 16])
def test_concurrent_requests_with_shared_prefixes_match_the_uncached_engine(models, block_size):
    """Random prompts that share prefixes, arriving in waves while others run, in a pool small enough to reclaim
    cached blocks and preempt: every output equals the engine without caching, and nothing leaks."""
    ours = models[1]
    rng = random.Random(block_size)
    stems = [tokens(rng.randint(20, 60), 10 + i) for i in range(3)]
    prompts = []
    for i in range(20):
        stem = rng.choice(stems + prompts) if prompts else stems[0]
        cut = len(stem) if rng.random() < 0.5 else rng.randint(1, len(stem))  # an extension, or a shared prefix
        prompts.append(stem[:cut] + tokens(rng.randint(1, 12), 100 + i))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    plain = LLMEngine(ours, config=EngineConfig(block_size=block_size, max_num_batched_tokens=64))
    for i, p in enumerate(prompts):
        plain.add_request(str(i), p, params)
    want = {k: v.outputs[0].token_ids for k, v in run(plain).items()}

    engine = caching_engine(ours, block_size=block_size, max_num_batched_tokens=19, max_num_seqs=6, prefix_cache_states=4)
    usable = shrink(engine, -(-100 // block_size) * 2)  # two sequences of ~100 tokens: reclaims and preemptions
    done = {}
    for wave in range(0, len(prompts), 6):
        for i in range(wave, min(wave + 6, len(prompts))):
            engine.add_request(str(i), prompts[i], params)
        for _ in range(3):  # the next wave arrives while this one runs
            done.update({out.request_id: out for out in engine.step() if out.finished})
    done.update(run(engine))
    assert {k: v.outputs[0].token_ids for k, v in done.items()} == want
    assert sum(o.num_cached_tokens for o in done.values()) > 0
    assert_cache_released(engine, usable)


def test_preempted_sequences_resume_from_their_cached_blocks(models):
    """80 K/V tokens for three 30 + 12-token sequences: preemptions, whose recomputes skip cached blocks."""
    hf, ours = models
    prompts = [tokens(30, 20 + i) for i in range(3)]
    fed, outs = {}, {}
    for caching in (False, True):
        engine = caching_engine(ours, max_num_batched_tokens=64, enable_prefix_caching=caching)
        usable = shrink(engine, 20)
        fed[caching] = counting(engine)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, GREEDY)
        done = run(engine)
        outs[caching] = [done[str(i)].outputs[0].token_ids for i in range(3)]
        assert sum(o.metrics.num_preemptions for o in done.values()) > 0
    assert outs[True] == outs[False] == [reference(hf, p) for p in prompts]
    assert sum(fed[True]) < sum(fed[False])
    assert_cache_released(engine, usable)


def test_forked_samples_share_cached_blocks(models):
    hf, ours = models
    engine = caching_engine(ours)
    a = tokens(33, 30)
    params = SamplingParams(n=3, temperature=0.0, max_tokens=NEW, ignore_eos=True)
    out = generate(engine, "a", a, params)
    assert [c.token_ids for c in out.outputs] == [reference(hf, a)] * 3
    again = generate(engine, "b", a, params)
    assert again.num_cached_tokens == 32 and [c.token_ids for c in again.outputs] == [reference(hf, a)] * 3
    assert_cache_released(engine)


def test_prompt_logprobs_requests_compute_every_position(models):
    engine = caching_engine(models[1])
    a = tokens(30, 40)
    generate(engine, "a", a)
    scored = generate(engine, "b", a, SamplingParams(max_tokens=1, prompt_logprobs=0))
    assert scored.num_cached_tokens == 0 and len(scored.prompt_logprobs) == len(a)
    assert_cache_released(engine)


@pytest.mark.parametrize("pattern", ["ME*MEM*E", "MEME", "*E*E"])
def test_sampled_outputs_are_those_of_the_uncached_engine(pattern):
    """Hybrid, Mamba-only and attention-only models; seeded sampling with penalties draws the same tokens, with the
    same logprobs to float32 rounding (a resumed state that is off by a token moves them by far more)."""
    model = NemotronHForCausalLM(CONFIG.replace(layers_block_type=pattern_to_kinds(pattern))).eval()
    model.init_weights(torch.Generator().manual_seed(3))
    a = tokens(37, 50)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=10, presence_penalty=0.3, ignore_eos=True,
                            logprobs=0)  # fmt: skip
    want = generate(LLMEngine(model, config=EngineConfig(block_size=4)), "a", a, params).outputs[0]
    engine = caching_engine(model)
    for rid, cached in (("a", 0), ("b", 36)):
        out = generate(engine, rid, a, params)
        assert out.num_cached_tokens == cached and out.outputs[0].token_ids == want.token_ids
        got = [e[t].logprob for e, t in zip(out.outputs[0].logprobs, want.token_ids)]
        ref = [e[t].logprob for e, t in zip(want.logprobs, want.token_ids)]
        assert got == pytest.approx(ref, rel=1e-4, abs=1e-5)
    assert_cache_released(engine)


def test_snapshot_states_equal_an_uncached_prefill(models):
    """The state saved inside a chunk is the state a prefill of exactly that many tokens leaves (conv window and
    SSM state), to float32 rounding of a differently split scan."""
    ours = models[1]
    engine = caching_engine(ours)
    a = tokens(26, 60)
    generate(engine, "a", a)
    node = engine.cache.prefix.match(a + [0])[0][-1]
    assert node.depth * 4 == 24
    plain = LLMEngine(ours, config=EngineConfig(block_size=4))
    seq = plain.cache.open()
    plain.cache.grow(seq, 24)
    plain.runner.step([Segment(seq, a[:24], decode=False, want_logits=True)])  # one chunk of exactly 24 tokens
    torch.testing.assert_close(engine.cache.ssm[:, node.state], plain.cache.ssm[:, seq.slot], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(engine.cache.conv[:, node.state], plain.cache.conv[:, seq.slot], rtol=1e-5, atol=1e-6)


def test_options_are_checked():
    with pytest.raises(ValueError, match="prefix_cache_states"):
        CacheConfig(enable_prefix_caching=True, prefix_cache_states=-1)
    with pytest.raises(ValueError, match="prefix-cache snapshots"):
        HybridCache(CONFIG, CacheConfig(memory_bytes=1 << 16, enable_prefix_caching=True), torch.float32)


def test_trie_reclaims_least_recently_used_leaves_first():
    freed = []
    trie = PrefixCache(2, False, freed.append, lambda s: None, lambda: None)
    a = trie.insert(trie.root, (1, 2), 10)
    b = trie.insert(a, (3, 4), 11)
    c = trie.insert(trie.root, (5, 6), 12)
    trie.release([a, b])
    trie.release([c])
    assert trie.evictable_blocks == 3
    trie.evict_blocks(1)
    assert freed == [11]  # b: a leaf, released before c (a is not a leaf while b hangs below it)
    trie.evict_blocks(2)
    assert sorted(freed) == [10, 11, 12] and trie.num_nodes == 0
    with pytest.raises(MemoryError):
        trie.evict_blocks(1)


def check_accounting(cache: HybridCache, open_seqs: list) -> None:
    """Every block and snapshot slot is in exactly one place, and the trie's counters match a recount."""
    nodes, stack = [], list(cache.prefix.root.children.values())
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.children.values())
    private = [b for s in open_seqs for b in s.blocks[len(s.nodes) :]]
    cached = [n.block for n in nodes if n.block is not None]
    assert sorted(cache.free_blocks._free + private + cached) == list(range(cache.num_blocks))
    states = [n.state for n in nodes if n.state is not None]
    assert sorted(cache.free_snapshots._free + states) == list(range(4, 4 + cache.free_snapshots.capacity))
    for node in nodes:
        assert node.refs == sum(node in s.nodes for s in open_seqs)
    assert cache.prefix.evictable_blocks == sum(1 for n in nodes if n.refs == 0 and n.block is not None)
    assert all(n.block is not None or n.state is not None or n.children or n.refs for n in nodes)  # no dead nodes
    assert cache.prefix.num_nodes == len(nodes)
    for s in open_seqs:  # a held chain is a path from the root, and the table points at its blocks
        assert all(b.parent is a for a, b in zip([cache.prefix.root, *s.nodes], s.nodes))
        assert s.blocks[: len(s.nodes)] == ([n.block for n in s.nodes] if cache.has_attention else [])


@pytest.mark.parametrize("pattern", ["ME*MEM*E", "MEME"])
@pytest.mark.parametrize("seed", range(4))
def test_random_operations_keep_the_pools_whole(seed, pattern):
    """Sequences over a 3-token alphabet (so prefixes repeat) open from the trie, grow, commit, snapshot and close in
    random order under a pool small enough to reclaim; the accounting holds after every operation (the model is not
    run: this is the allocator alone)."""
    rng = random.Random(seed)
    config = CONFIG.replace(layers_block_type=pattern_to_kinds(pattern))
    cache = HybridCache(config, CacheConfig(memory_bytes=1 << 22, block_size=2, max_num_seqs=4,
                                            enable_prefix_caching=True, prefix_cache_states=3), torch.float32)  # fmt: skip
    if cache.has_attention:
        cache.num_blocks, cache.free_blocks._free = 24, list(range(24))  # 24 usable blocks of 2 tokens
    open_seqs, ids = [], {}
    for _ in range(300):
        op = rng.random()
        if op < 0.3 and len(cache.free_slots):
            tokens = [rng.randint(0, 2) for _ in range(rng.randint(2, 14))]
            nodes, _ = cache.prefix.match(tokens)
            if cache.blocks_needed(None, len(tokens) - 2 * len(nodes)) <= cache.available_blocks(nodes):
                seq = cache.open(nodes)
                ids[id(seq)] = tokens
                open_seqs.append(seq)
        elif op < 0.7 and open_seqs:  # feed some of a sequence's pending tokens (or new ones), then commit
            seq = rng.choice(open_seqs)
            tokens = ids[id(seq)]
            if seq.num_tokens == len(tokens):
                tokens.append(rng.randint(0, 2))
            n = rng.randint(1, len(tokens) - seq.num_tokens)
            if not cache.can_grow(seq, n):
                continue
            cache.grow(seq, n)
            seq.num_tokens += n
            cache.commit(seq, lambda a, b, t=tokens: t[a:b])
            if seq.num_tokens % 2 == 0 and rng.random() < 0.5:
                cache.save_state(seq)
        elif op < 0.8 and open_seqs and len(cache.free_slots) and cache.can_fork(open_seqs[0]):
            parent = rng.choice(open_seqs)
            if cache.can_fork(parent):
                child = cache.fork(parent)
                ids[id(child)] = list(ids[id(parent)])
                open_seqs.append(child)
        elif op < 0.97 and open_seqs:
            cache.close(open_seqs.pop(rng.randrange(len(open_seqs))))
        else:
            cache.reset_prefix_cache()
        check_accounting(cache, open_seqs)
    for seq in open_seqs:
        cache.close(seq)
    assert cache.reset_prefix_cache() and len(cache.free_blocks) == cache.num_blocks and len(cache.free_snapshots) == 3
