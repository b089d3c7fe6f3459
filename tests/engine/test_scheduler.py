"""Cache pools and scheduler, driven without a model: leaks, preemption, fairness, budgets."""

import random

import pytest
import torch

from nemotron3.config import preset
from nemotron3.engine.cache import CacheConfig, HybridCache
from nemotron3.engine.sampling_params import SamplingParams
from nemotron3.engine.scheduler import Scheduler, SchedulerConfig, Sequence, Status


def make(num_blocks: int, block_size=4, max_seqs=4, budget=16, chunked=True):
    cfg = preset("tiny")
    cache = HybridCache(cfg, CacheConfig(memory_bytes=64 << 20, block_size=block_size, max_num_seqs=max_seqs), torch.float32)
    cache.free_blocks.take(cache.num_blocks - num_blocks)  # keep exactly num_blocks usable
    return cache, Scheduler(SchedulerConfig(budget, max_seqs, chunked), cache)


def simulate(sched: Scheduler, seqs: list[Sequence], max_steps=10_000):
    """Run the scheduler as the engine would, with a fake model that emits token 7; returns per-step logs."""
    log = []
    for step in range(max_steps):
        if not sched.has_work():
            return log
        out = sched.schedule()
        assert out, "scheduler stalled with work queued"
        fed = {s.seq_id: 1 for s in out.decodes} | {s.seq_id: n for s, n in out.prefills}
        assert sum(fed.values()) <= sched.config.max_num_batched_tokens or len(fed) == 1
        for s in out.decodes + [s for s, _ in out.prefills]:
            s.cache.num_tokens += fed[s.seq_id]
            assert len(s.cache.blocks) * sched.cache.block_size >= s.cache.num_tokens  # blocks cover tokens
            if s.num_pending == 0:  # a forward reached the end: sample
                s.output_ids.append(7)
                if len(s.output_ids) >= s.params.max_tokens:
                    sched.finish(s)
        log.append(fed)
    raise AssertionError("did not finish")


def seqs_for(lengths, max_tokens=6):
    params = SamplingParams(max_tokens=max_tokens)
    return [Sequence(i, str(i), 0, [1] * n, params, arrival=i) for i, n in enumerate(lengths)]


@pytest.mark.parametrize("chunked", [True, False])
def test_everything_finishes_and_pools_are_whole_again(chunked):
    cache, sched = make(num_blocks=10, budget=16, chunked=chunked)
    seqs = seqs_for([9, 3, 14, 5, 1, 11, 7])
    for s in seqs:
        sched.add(s)
    simulate(sched, seqs)
    assert all(s.status is Status.FINISHED and len(s.output_ids) == 6 for s in seqs)
    assert len(cache.free_blocks) == 10 and len(cache.free_slots) == 4
    assert sorted(cache.free_blocks._free) == sorted(set(cache.free_blocks._free))  # no id returned twice


def test_preemption_happens_and_nobody_starves():
    cache, sched = make(num_blocks=7, block_size=4, max_seqs=4, budget=32)
    seqs = seqs_for([8, 8, 8, 8, 8], max_tokens=12)  # 5 × 20 tokens need 25 blocks; only 7 exist
    for s in seqs:
        sched.add(s)
    simulate(sched, seqs)
    assert sum(s.num_preemptions for s in seqs) > 0
    assert all(len(s.output_ids) == 12 for s in seqs)
    assert seqs[0].num_preemptions == 0  # the oldest request is never the victim
    assert len(cache.free_blocks) == 7 and len(cache.free_slots) == 4


def test_fifo_admission_and_token_budget():
    cache, sched = make(num_blocks=200, max_seqs=3, budget=10)
    seqs = seqs_for([4, 25, 2, 6, 3])
    for s in seqs:
        sched.add(s)
    first_step = {}
    for step, fed in enumerate(simulate(sched, seqs)):
        for sid in fed:
            first_step.setdefault(sid, step)
        assert sum(fed.values()) <= 10
    order = [first_step[s.seq_id] for s in seqs]
    assert order == sorted(order)  # older requests never start after younger ones


def test_random_workloads_never_leak():
    rng = random.Random(0)
    for trial in range(20):
        cache, sched = make(num_blocks=rng.randint(8, 30), block_size=rng.choice([2, 4, 8]), max_seqs=rng.randint(1, 5),
                            budget=rng.randint(4, 40), chunked=rng.random() < 0.7)  # fmt: skip
        usable = len(cache.free_blocks)
        seqs = seqs_for([rng.randint(1, 12) for _ in range(rng.randint(1, 8))], max_tokens=rng.randint(1, 8))
        for s in seqs:
            sched.add(s)
        # cancel one request part-way, as an abort would
        victim = rng.choice(seqs)
        for _ in range(rng.randint(0, 3)):
            if sched.has_work():
                out = sched.schedule()
                for s in out.decodes + [s for s, _ in out.prefills]:
                    s.cache.num_tokens += 1 if s in out.decodes else dict((x.seq_id, n) for x, n in out.prefills)[s.seq_id]
                    if s.num_pending == 0:
                        s.output_ids.append(7)
        sched.finish(victim)
        simulate(sched, [s for s in seqs if s is not victim])
        assert len(cache.free_blocks) == usable, trial
        assert len(cache.free_slots) == cache.free_slots.capacity, trial
        assert not sched.running and not sched.waiting


def test_id_views_match_all_ids():
    """last_id / ids_slice (used every step instead of building prompt + output) agree with all_ids."""
    seq = Sequence(0, "0", 0, [5, 6, 7], SamplingParams(max_tokens=4), arrival=0)
    assert seq.last_id == 7
    seq.output_ids += [8, 9]
    assert seq.last_id == 9
    n = len(seq.all_ids)
    for a in range(n + 1):
        for b in range(a, n + 2):
            assert seq.ids_slice(a, b) == seq.all_ids[a:b], (a, b)
