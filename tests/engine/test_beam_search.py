"""Beam search: against transformers' beam search, against a plain reference that reruns the whole sequence every
step, beside other requests, under preemption, with prefix caching, and bad input."""

import dataclasses

import pytest
import torch

from nemotron3 import BeamSearchParams, SamplingParams
from nemotron3.config import pattern_to_kinds
from nemotron3.engine.beam_search import BeamGroup, select
from nemotron3.engine.engine import EngineConfig, LLMEngine
from nemotron3.engine.llm import LLM
from nemotron3.engine.scheduler import Sequence
from nemotron3.model import NemotronHForCausalLM
from tests.engine.test_engine import CONFIG, assert_pools_empty, hf_and_ours
from tests.engine.test_parallel_sampling import counting

PROMPT_LENS = (7, 19, 3)


@pytest.fixture(scope="module")
def models():
    return hf_and_ours(3)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, CONFIG.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]


def reference(model, prompt, params: BeamSearchParams, eos: set[int]) -> list[tuple[list[int], float]]:
    """Beam search as engine/beam_search.py defines it, written plainly: every step reruns each beam's whole
    sequence through the model (no cache), ranks all (beam, token) extensions of the 2k best tokens of each beam
    (one end-of-sequence token here) by cumulative logprob, retires an end-of-sequence extension among the best k, keeps the best k others, and
    runs to max_tokens. Returns the best k (tokens, cumulative logprob) by cum / length ** length_penalty."""
    k, t = params.beam_width, params.temperature or 1.0
    eos = set() if params.ignore_eos else eos
    beams, finished = [([], 0.0)], []
    with torch.no_grad():
        for _ in range(params.max_tokens):
            ranked = []
            for b, (out, cum) in enumerate(beams):
                logits = model(torch.tensor([prompt + out])).logits[0, -1]
                top = torch.log_softmax(logits.float() / t, -1).topk(2 * k)
                ranked += [(cum + v, b, r, tok) for r, (v, tok) in enumerate(zip(top.values.tolist(), top.indices.tolist()))]
            ranked.sort(key=lambda c: (-c[0], c[1], c[2]))
            nxt = []
            for place, (cum, b, _, tok) in enumerate(ranked):
                if tok in eos:
                    if place < k:
                        finished.append((beams[b][0] + [tok], cum))
                    continue
                nxt.append((beams[b][0] + [tok], cum))
                if len(nxt) == k:
                    break
            beams = nxt

    def score(h):
        out, cum = h
        return cum / len(out) ** params.length_penalty

    return sorted(finished + beams, key=lambda h: -score(h))[:k]


def run(llm: LLM, prompts, params: BeamSearchParams):
    return [[(s.tokens[len(p) :], s.cum_logprob) for s in o.sequences] for p, o in
            zip(prompts, llm.beam_search([{"prompt_token_ids": p} for p in prompts], params))]  # fmt: skip


def assert_same(got, want):
    for g, w in zip(got, want):
        assert [t for t, _ in g] == [t for t, _ in w]
        # float32 logits of the cached engine against full reruns: ~1e-5 per step, over ≤ 10 steps
        assert [c for _, c in g] == pytest.approx([c for _, c in w], abs=1e-3)


def test_matches_transformers_beam_search(models, prompts):
    hf, ours = models
    k, n = 4, 8
    llm = LLM(ours)
    fed = counting(llm.engine)
    got = run(llm, prompts, BeamSearchParams(beam_width=k, max_tokens=n, ignore_eos=True))
    assert sum(fed) == sum(map(len, prompts))  # each prompt prefilled once: the beams fork, none recomputes
    for p, beams in zip(prompts, got):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), num_beams=k, num_return_sequences=k, do_sample=False,
                              max_new_tokens=n, eos_token_id=None, pad_token_id=0, length_penalty=1.0,
                              output_scores=True, return_dict_in_generate=True)  # fmt: skip
        assert [t for t, _ in beams] == out.sequences[:, len(p) :].tolist()
        # transformers reports cum / generated length ** length_penalty
        assert [c / n for _, c in beams] == pytest.approx(out.sequences_scores.tolist(), abs=1e-4)
    assert_pools_empty(llm.engine)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_matches_transformers_with_finished_hypotheses(length_penalty):
    hf, ours = hf_and_ours(7)
    with torch.no_grad():  # end of sequence (2, CONFIG's) likely: beams finish at different lengths
        for m in (hf, ours):
            m.lm_head.weight[2] *= 6
    k, n = 3, 10
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, CONFIG.vocab_size, (m,), generator=g).tolist() for m in (4, 13)]
    params = BeamSearchParams(beam_width=k, max_tokens=n, length_penalty=length_penalty)
    got = run(LLM(ours), prompts, params)
    assert any(t[-1] == 2 for beams in got for t, _ in beams)
    for p, beams in zip(prompts, got):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), num_beams=k, num_return_sequences=k, do_sample=False,
                              max_new_tokens=n, eos_token_id=2, pad_token_id=0, length_penalty=length_penalty,
                              early_stopping="never", output_scores=True, return_dict_in_generate=True)  # fmt: skip
        want = [row[len(p) :] for row in out.sequences.tolist()]
        want = [row[: row.index(2) + 1] if 2 in row else row for row in want]  # padding after the end dropped
        assert [t for t, _ in beams] == want
        scores = [c / len(t) ** length_penalty for t, c in beams]
        assert scores == pytest.approx(out.sequences_scores.tolist(), abs=1e-4)


def eos_prone(seed: int, pattern: str) -> tuple[NemotronHForCausalLM, set[int]]:
    """A random model whose end-of-sequence tokens (1 and 2) are likely (their lm_head rows scaled up), so that
    beams finish at different lengths."""
    config = dataclasses.replace(CONFIG, layers_block_type=pattern_to_kinds(pattern), eos_token_id=1)
    model = NemotronHForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.lm_head.weight[1:3] *= 6
    return model.eval(), {1}


@pytest.mark.parametrize("pattern", ["ME*MEM*E", "MEMEM", "*E*E"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, -0.5])
def test_matches_a_plain_reference_with_finished_hypotheses(prompts, pattern, length_penalty):
    model, eos = eos_prone(11, pattern)
    params = BeamSearchParams(beam_width=3, max_tokens=10, length_penalty=length_penalty)
    got = run(LLM(model), prompts, params)
    want = [reference(model, p, params, eos) for p in prompts]
    assert_same(got, want)
    # the test is only worth something if some hypotheses ended with the end-of-sequence token
    assert any(t[-1] in eos for beams in got for t, _ in beams)


def test_temperature_ranks_by_the_tempered_distribution(models, prompts):
    params = BeamSearchParams(beam_width=3, max_tokens=6, temperature=0.5, ignore_eos=True)
    got = run(LLM(models[1]), prompts, params)
    assert_same(got, [reference(models[1], p, params, set()) for p in prompts])


@pytest.mark.parametrize(
    "options",
    [
        {"max_num_batched_tokens": 5},  # a group's beams split over steps: the first ones wait for the others
        {"max_num_seqs": 5, "block_size": 4},  # forks that find no room queue to recompute
        {"enable_prefix_caching": True, "block_size": 4},
    ],
)
def test_beside_sampled_requests_and_under_pressure(models, prompts, options):
    _, ours = models
    params = BeamSearchParams(beam_width=3, max_tokens=9, ignore_eos=True)
    alone = run(LLM(ours), prompts, params)
    engine = LLMEngine(ours, config=EngineConfig(**options))
    if "max_num_seqs" in options:  # 14 blocks of 4 tokens: three beams of ~28 tokens and a sampled request
        engine.cache.free_blocks.take(engine.cache.num_blocks - 14)
    sampled = SamplingParams(temperature=1.0, seed=1, max_tokens=12, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"b{i}", p, params)
        engine.add_request(f"s{i}", p, sampled)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    got = [[(c.token_ids, c.cumulative_logprob) for c in done[f"b{i}"].outputs] for i in range(len(prompts))]
    assert_same(got, alone)
    assert all(len(done[f"s{i}"].outputs[0].token_ids) == 12 for i in range(len(prompts)))
    if "max_num_seqs" in options:
        assert len(engine.cache.free_blocks) == 14 and len(engine.cache.free_slots) == 5
    else:
        engine.reset_prefix_cache()
        assert_pools_empty(engine)


def test_output_fields(models, prompts):
    params = BeamSearchParams(beam_width=2, max_tokens=5, ignore_eos=True)
    (out,) = LLM(models[1]).beam_search({"prompt_token_ids": prompts[0]}, params)
    assert len(out.sequences) == 2
    best, second = out.sequences
    assert best.cum_logprob >= second.cum_logprob
    for s in out.sequences:
        assert s.tokens[: len(prompts[0])] == prompts[0] and len(s.tokens) == len(prompts[0]) + 5
        assert s.finish_reason == "length" and s.text is None  # no tokenizer
        assert len(s.logprobs) == 5
        chosen = [entry[t].logprob for entry, t in zip(s.logprobs, s.tokens[len(prompts[0]) :])]
        assert sum(chosen) == pytest.approx(s.cum_logprob, abs=1e-5)
        assert all(len(entry) == 4 and sorted(e.rank for e in entry.values()) == [1, 2, 3, 4] for entry in s.logprobs)


def test_abort_returns_everything_to_the_pools(models, prompts):
    engine = LLMEngine(models[1])
    engine.add_request("b", prompts[1], BeamSearchParams(beam_width=4, max_tokens=50, ignore_eos=True))
    for _ in range(4):
        assert engine.step() == []  # nothing is streamed before the search ends
    out = engine.abort("b")
    assert out.finished and len(out.outputs) == 4
    assert all(c.finish_reason == "abort" and len(c.token_ids) == 4 for c in out.outputs)  # one per step
    assert_pools_empty(engine)
    assert not engine.has_unfinished_requests()


def test_select_ranks_extensions_and_retires_eos_among_the_best():
    group = BeamGroup(BeamSearchParams(beam_width=2, max_tokens=5), max_new=5)

    def beam(cum, values, ids):
        s = Sequence(0, "r", 0, [5], SamplingParams(), 0, output_ids=[7], cumulative_logprob=cum)
        s.candidates = (values, ids)
        return s

    a = beam(-1.0, [-0.1, -0.5, -2.0, -3.0], [10, 1, 11, 12])  # 1 is end-of-sequence
    b = beam(-1.2, [-0.2, -0.3, -0.4, -5.0], [20, 21, 1, 22])
    children = select(group, [a, b], {1})
    # ranked: a10 -1.1, a1 -1.5 (eos, place 1 < 2: finished), b20 -1.4 ... order: -1.1 a10, -1.4 b20, -1.5 a1, -1.5 b21
    assert [(c.parent, c.token) for c in children] == [(0, 10), (1, 20)]
    assert group.finished == []  # a1 ranked third: not among the best two
    children = select(group, [a, beam(-3.0, [-0.1, -0.2, -0.3, -0.4], [30, 31, 32, 33])], {1})
    assert [(c.parent, c.token) for c in children] == [(0, 10), (0, 11)]
    assert [h.output_ids for h in group.finished] == [[7, 1]]
    assert group.finished[0].cum_logprob == pytest.approx(-1.5)
    # an end-of-sequence extension ranked third, before the second child: not among the best two, not finished
    group.finished = []
    c = beam(-1.0, [-0.1, -0.3, -0.6, -0.7], [30, 1, 31, 32])
    d = beam(-1.0, [-0.35, -0.5, -0.8, -0.9], [1, 40, 41, 42])
    children = select(group, [c, d], {1})
    assert [(ch.parent, ch.token) for ch in children] == [(0, 30), (1, 40)]
    assert [h.output_ids for h in group.finished] == [[7, 1]] and group.finished[0].cum_logprob == pytest.approx(-1.3)
    ignore = BeamGroup(BeamSearchParams(beam_width=2, max_tokens=5, ignore_eos=True), max_new=5)
    assert [(c.parent, c.token) for c in select(ignore, [a, b], {1})] == [(0, 10), (1, 20)]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"beam_width": 0, "max_tokens": 4}, "beam_width"),
        ({"beam_width": 2, "max_tokens": 0}, "max_tokens"),
        ({"beam_width": 2.5, "max_tokens": 4}, "beam_width"),
        ({"beam_width": 2, "max_tokens": 4, "temperature": -1.0}, "temperature"),
        ({"beam_width": 2, "max_tokens": 4, "length_penalty": float("nan")}, "length_penalty"),
    ],
)
def test_bad_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BeamSearchParams(**kwargs)


def test_refusals(models, prompts):
    llm = LLM(models[1], max_num_seqs=4, kv_cache_memory_bytes=1 << 20, block_size=16)
    assert llm.engine.cache.num_blocks < 4 * 32 <= llm.engine.max_model_len // 16 * 4  # 4 beams of 512 do not fit
    with pytest.raises(ValueError, match="beam_width 5 is more than max_num_seqs 4"):
        llm.beam_search({"prompt_token_ids": prompts[0]}, BeamSearchParams(beam_width=5, max_tokens=4))
    with pytest.raises(ValueError, match="K/V blocks"):
        llm.beam_search({"prompt_token_ids": prompts[0]}, BeamSearchParams(beam_width=4, max_tokens=500))
    with pytest.raises(ValueError, match="BeamSearchParams"):
        llm.beam_search({"prompt_token_ids": prompts[0]}, SamplingParams())
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.beam_search({"prompt_token_ids": []}, BeamSearchParams(beam_width=2, max_tokens=4))
    assert_pools_empty(llm.engine)
