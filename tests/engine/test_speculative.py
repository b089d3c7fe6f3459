"""MTP speculative decoding: lossless greedy and sampling, state rollback, acceptance, metrics, config errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemotron3 import BeamSearchParams, SamplingParams
from nemotron3.config import ATTENTION, MAMBA, MOE, ModelConfig, pattern_to_kinds, preset
from nemotron3.engine.engine import EngineConfig
from nemotron3.engine.llm import LLM
from nemotron3.engine.speculative import SpeculativeConfig, SpeculativeEngine
from nemotron3.model import NemotronHForCausalLM
from nemotron3.model.attention import Attention
from nemotron3.model.mamba2 import Mamba2Mixer
from nemotron3.model.mlp import MLP
from nemotron3.model.moe import MoE

ROOT = Path(__file__).resolve().parents[2]
PROMPT_LENS = (5, 17, 1, 33, 9)
NEW = 14
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)


def spec(k: int, **extra) -> dict:
    return {"method": "mtp", "num_speculative_tokens": k, **extra}


def build(config: ModelConfig, seed: int = 0) -> NemotronHForCausalLM:
    model = NemotronHForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval()


def out_projections(modules) -> list[torch.Tensor]:
    """The weights that write each mixer's output into the residual stream."""
    outs = []
    for mixer in modules:
        if isinstance(mixer, Mamba2Mixer):
            outs.append(mixer.out_proj.weight)
        elif isinstance(mixer, Attention):
            outs.append(mixer.o_proj.weight)
        elif isinstance(mixer, MoE):
            routed = mixer.fc2_latent_proj.weight if mixer.fc2_latent_proj is not None else mixer.experts.down_proj
            outs += [routed, mixer.shared_experts.down_proj.weight]
        elif isinstance(mixer, MLP):
            outs.append(mixer.down_proj.weight)
    return outs


@torch.no_grad()
def oracle_model(mix_scale: float = 0.0, seed: int = 0, config: ModelConfig | None = None) -> NemotronHForCausalLM:
    """A tiny model whose MTP block drafts the target's own greedy token.

    Every main mixer's output projection is scaled by `mix_scale`: at 0 the residual stream is just the
    token embedding, so the target is a bigram model, argmax lm_head(norm_f(embed(x_t))). The MTP block
    is set to compute c·norm_f(embed(next token)) with c > 0 — eh_proj = [I | 0] keeps only the enorm'd
    embedding, its own mixers write nothing, final_layernorm = norm_f — so its argmax is the target's
    greedy next token after the token it is fed, at every draft depth. Every draft is right: acceptance
    is k+1 per step. 0 < mix_scale lets the mixers (Mamba, attention, MoE) move the target away from the
    bigram, so drafts are right only sometimes: mixed accept/reject patterns on a real model.
    """
    model = build(config or preset("tiny"), seed)
    for w in out_projections(b.mixer for b in model.backbone.layers):
        w.mul_(mix_scale)
    H = model.config.hidden_size
    first, last = model.mtp.layers[0], model.mtp.layers[-1]
    first.eh_proj.weight.zero_()
    first.eh_proj.weight[:, :H] = torch.eye(H)
    for w in out_projections(layer.mixer for layer in model.mtp.layers):
        w.zero_()
    last.final_layernorm.weight.copy_(model.backbone.norm_f.weight)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these tests run many tiny forwards, which 2-thread OpenMP only slows down."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build(preset("tiny"))


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]


MEM = 8 << 20  # cache budget for the tests' LLMs (the default 2 GiB is slow to allocate)


def greedy_ids(model, prompts, speculative_config=None, **options):
    llm = LLM(model, speculative_config=speculative_config, kv_cache_memory_bytes=MEM, **options)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    return [o.outputs[0].token_ids for o in outs], llm, outs


@pytest.fixture(scope="module")
def reference(tiny, prompts):
    return greedy_ids(tiny, prompts)[0]


# ------------------------------------------------------------------------------------------ greedy


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_greedy_token_identical_random_model(tiny, prompts, reference, k):
    """Random weights: drafts are nearly always wrong; the output must still be the target's greedy output,
    with whole prompts in one step and with chunked prefill mixed into verify steps."""
    for options in ({}, {"max_num_batched_tokens": 7}):
        ids, llm, outs = greedy_ids(tiny, prompts, spec(k), **options)
        assert ids == reference, options
        m = outs[0].metrics.spec_decode
        assert m is not None and m.num_steps > 0 and len(m.acceptance_rate_per_position) == k
        assert_pools_empty(llm.engine)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_identical_under_preemption(tiny, prompts, reference, k):
    cfg = EngineConfig(block_size=8, max_num_seqs=5, max_model_len=48, kv_cache_memory_bytes=MEM)
    engine = SpeculativeEngine(tiny, config=cfg, speculative_config=spec(k))
    engine.cache.free_blocks.take(engine.cache.num_blocks - 6)  # 6 blocks of 8: not enough for all five
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    done = run(engine)
    assert [done[str(i)].outputs[0].token_ids for i in range(len(prompts))] == reference
    assert sum(o.metrics.num_preemptions for o in done.values()) > 0
    assert len(engine.cache.free_blocks) == 6 and len(engine.cache.free_slots) == 5


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_oracle_mtp_accepts_every_draft(prompts, k):
    """The constructed model's MTP always drafts the target's greedy token: every step emits k+1 tokens."""
    model = oracle_model(0.0)
    ref = greedy_ids(model, prompts)[0]
    ids, llm, outs = greedy_ids(model, prompts, spec(k))
    assert ids == ref
    for o in outs:
        m = o.metrics.spec_decode
        # every step accepts all its drafts and emits k+1 tokens; near max_tokens the engine drafts only
        # what can still be used (left − 1), so the last step may carry fewer drafts, or none
        full, rest = divmod(NEW - 1, k + 1)
        assert m.num_accepted_tokens == m.num_draft_tokens
        assert m.num_steps == full + (rest >= 2)
        assert m.num_emitted_tokens == NEW - 1 - (rest == 1)
        assert m.drafted_per_position[:k] == m.accepted_per_position[:k]
        if rest <= 1:
            assert m.mean_acceptance_length == k + 1
    assert llm.engine.stats.acceptance_rate_per_position == [1.0] * k


@pytest.mark.parametrize("rollback", ["select", "recompute"])
def test_partial_acceptance_identical(prompts, rollback):
    """Mixers at 0.5: drafts are right about half the time, so steps accept every prefix length."""
    model = oracle_model(0.5)
    ref = greedy_ids(model, prompts)[0]
    for k in (2, 4):
        for options in ({}, {"max_num_batched_tokens": 9}):
            ids, llm, _ = greedy_ids(model, prompts, spec(k, rollback=rollback), **options)
            assert ids == ref, (k, options)
            rates = llm.engine.stats.acceptance_rate_per_position
            assert 0.1 < rates[0] < 0.95, rates  # a real mix of accepts and rejects


# ------------------------------------------------------------------------------------------ state


@torch.no_grad()
def check_cache_matches_prefill(engine: SpeculativeEngine, seq) -> None:
    """Mamba conv/SSM states, main K/V and committed MTP K/V equal a fresh prefill of the cached tokens."""
    model, cache = engine.model, engine.cache
    n = seq.cache.num_tokens
    ids = torch.tensor([seq.all_ids[:n]])
    fresh = model.new_cache(1)
    out = model(ids, cache=fresh)
    for i, kind in enumerate(model.config.layers_block_type):
        st = fresh.layers[i]
        if kind == MAMBA:
            j = cache.mamba_index[i]
            torch.testing.assert_close(cache.conv[j, seq.cache.slot], st.conv[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cache.ssm[j, seq.cache.slot], st.ssm[0], rtol=1e-5, atol=1e-5)
        elif kind == ATTENTION:
            k, v = cache.kv_view(i, seq.cache, n)
            torch.testing.assert_close(k, st.k[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, st.v[0], rtol=1e-5, atol=1e-5)
    # the drafter: MTP position i saw (h_i, embed(x_{i+1})); all n positions are committed
    mtp_states = [
        a.mixer.new_state(1, model.dtype, model.device) if a.kind == ATTENTION else None for a in model.mtp.layers
    ]
    nxt = torch.tensor([seq.all_ids[1 : n + 1]])
    model.mtp(out.hidden_states, model.backbone.embeddings(nxt), 0, mtp_states)
    planes = iter(cache.mtp_planes)
    for layer, st in zip(model.mtp.layers, mtp_states):
        if layer.kind == ATTENTION:
            k, v = cache.plane_view(next(planes), seq.cache, n)
            torch.testing.assert_close(k, st.k[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, st.v[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rollback", ["select", "recompute"])
def test_states_equal_fresh_prefill_after_accept_reject(prompts, rollback):
    model = oracle_model(0.5)
    cfg = EngineConfig(block_size=4, kv_cache_memory_bytes=MEM)
    engine = SpeculativeEngine(model, config=cfg, speculative_config=spec(3, rollback=rollback))
    for i, p in enumerate(prompts[:3]):
        engine.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    checked, patterns = 0, set()
    while engine.has_unfinished_requests():
        before = engine.stats.num_accepted_tokens
        engine.step()
        patterns.add(engine.stats.num_accepted_tokens - before)
        for seq in engine.scheduler.running:
            if seq.is_decode:
                check_cache_matches_prefill(engine, seq)
                checked += 1
    assert checked > 10 and len(patterns) >= 3  # several different accept counts per step


# ------------------------------------------------------------------------------------------ sampling


def chi2_sf(x: float, df: int) -> float:
    return float(
        torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2, dtype=torch.float64))
    )


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson goodness of fit; cells with expected count < min_expected are pooled into one."""
    n = counts.sum()
    expected = probs * n
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum()[None]]) if small.any() else counts
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return chi2_sf(stat, int(keep.sum()) - 1)


MIX, LM_SCALE = 1.0, 40.0


def small_vocab_model() -> NemotronHForCausalLM:
    cfg = ModelConfig(
        vocab_size=12, hidden_size=32, layers_block_type=pattern_to_kinds("M*E"), num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=8, n_groups=1,
        chunk_size=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=16, max_position_embeddings=64, num_nextn_predict_layers=1,
        mtp_layers_block_type=[ATTENTION, MOE], eos_token_id=None,
    )  # fmt: skip
    model = oracle_model(MIX, seed=3, config=cfg)  # drafts related to, but not equal to, the target's
    with torch.no_grad():  # peaked distributions (random init is nearly uniform)
        model.lm_head.weight.mul_(LM_SCALE)
    return model


@torch.no_grad()
def exact_marginals(model, prompt: list[int], steps: int, temperature: float) -> list[torch.Tensor]:
    """P(token at generated position t) for t = 1 … steps under ancestral sampling from the target."""
    V = model.config.vocab_size
    paths, weights = torch.tensor([prompt]), torch.ones(1, dtype=torch.float64)
    marginals = []
    for _ in range(steps):
        p = (model(paths).logits[:, -1] / temperature).double().softmax(-1)  # [paths, V]
        joint = weights[:, None] * p
        marginals.append(joint.sum(0))
        paths = torch.cat([paths.repeat_interleave(V, 0), torch.arange(V).repeat(len(paths))[:, None]], 1)
        weights = joint.reshape(-1)
    return marginals


def test_sampling_distribution_matches_target():
    """temperature > 0: tokens 2 … 4 (all produced by verify steps, k = 2) follow the target's marginals."""
    model = small_vocab_model()
    prompt, temperature, n = [1, 5, 7], 1.0, 3000
    exact = exact_marginals(model, prompt, 4, temperature)
    llm = LLM(
        model, speculative_config=spec(2), max_num_seqs=n, max_num_batched_tokens=4 * n, kv_cache_memory_bytes=64 << 20
    )
    sp = SamplingParams(n=n, temperature=temperature, max_tokens=4, seed=1234)
    out = llm.generate({"prompt_token_ids": prompt}, sp)[0]
    toks = torch.tensor([c.token_ids for c in out.outputs])  # [n, 4]
    stats = llm.engine.stats
    assert 0.05 < stats.draft_acceptance_rate < 0.95, stats.draft_acceptance_rate  # both branches exercised
    pvalues = [chi2_pvalue(torch.bincount(toks[:, t], minlength=12).double(), exact[t]) for t in range(1, 4)]
    assert min(pvalues) > 0.01, pvalues
    # and the same test detects a wrong distribution: the MTP's own (draft) distribution is far off
    p_bad = chi2_pvalue(torch.bincount(toks[:, 1], minlength=12).double(), exact[1].roll(1))
    assert p_bad < 1e-6


def test_sampling_matches_non_speculative_samples():
    """Two-sample check: speculative and plain sampling of token 2 agree (chi-square on a 2×V table)."""
    model = small_vocab_model()
    prompt, n = [2, 9], 2000
    sp = SamplingParams(n=n, temperature=0.8, top_k=8, max_tokens=3, seed=7)
    a = LLM(model, max_num_seqs=n, max_num_batched_tokens=4 * n, kv_cache_memory_bytes=64 << 20).generate(
        {"prompt_token_ids": prompt}, sp
    )[0]
    b = LLM(
        model, speculative_config=spec(3), max_num_seqs=n, max_num_batched_tokens=4 * n, kv_cache_memory_bytes=64 << 20
    ).generate({"prompt_token_ids": prompt}, sp)[0]
    for t in (1, 2):
        ca = torch.bincount(torch.tensor([c.token_ids[t] for c in a.outputs]), minlength=12).double()
        cb = torch.bincount(torch.tensor([c.token_ids[t] for c in b.outputs]), minlength=12).double()
        keep = (ca + cb) > 0
        table = torch.stack([ca[keep], cb[keep]])
        expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
        stat = float(((table - expected) ** 2 / expected).sum())
        assert chi2_sf(stat, int(keep.sum()) - 1) > 0.01


# ------------------------------------------------------------------------------------------ the rest


def test_metrics_logprobs_and_stops(tiny, prompts):
    model = oracle_model(0.0)
    base = LLM(model, kv_cache_memory_bytes=MEM)
    sp = SamplingParams(temperature=0.0, max_tokens=12, logprobs=2, ignore_eos=True)
    ref = base.generate([{"prompt_token_ids": p} for p in prompts[:2]], sp)
    llm = LLM(model, speculative_config=spec(3), kv_cache_memory_bytes=MEM)
    got = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], sp)
    for r, g in zip(ref, got):
        assert g.outputs[0].token_ids == r.outputs[0].token_ids
        for lr, lg in zip(r.outputs[0].logprobs, g.outputs[0].logprobs):
            assert lr.keys() == lg.keys()
            for t in lr:
                assert lg[t].logprob == pytest.approx(lr[t].logprob, abs=1e-4)
        m = g.metrics.spec_decode
        assert m.mean_acceptance_length == pytest.approx(m.num_emitted_tokens / m.num_steps)
        assert m.draft_time > 0 and m.verify_time > 0
    # a stop token inside an accepted run ends the output there, as without speculation
    stop = ref[0].outputs[0].token_ids[5]
    sp = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop], ignore_eos=True)
    a = base.generate({"prompt_token_ids": prompts[0]}, sp)[0].outputs[0]
    b = llm.generate({"prompt_token_ids": prompts[0]}, sp)[0].outputs[0]
    assert b.token_ids == a.token_ids and b.finish_reason == "stop" and b.stop_reason == stop
    assert_pools_empty(llm.engine)


def test_penalties_decode_without_drafts(tiny, prompts):
    sp = SamplingParams(temperature=0.0, max_tokens=8, repetition_penalty=1.3, ignore_eos=True)
    a = LLM(tiny, kv_cache_memory_bytes=MEM).generate({"prompt_token_ids": prompts[1]}, sp)[0]
    b = LLM(tiny, speculative_config=spec(2), kv_cache_memory_bytes=MEM).generate({"prompt_token_ids": prompts[1]}, sp)[
        0
    ]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"method": "eagle", "num_speculative_tokens": 2}, "unknown method 'eagle'"),
        ({"method": "mtp", "num_speculative_tokens": 0}, "num_speculative_tokens must be >= 1"),
        ({"method": "mtp", "num_speculative_tokens": -3}, "num_speculative_tokens must be >= 1"),
        ({"method": "mtp", "num_speculative_tokens": 2.0}, "num_speculative_tokens must be an integer"),
        ({"method": "mtp", "num_speculative_tokens": "3"}, "num_speculative_tokens must be an integer"),
        ({"method": "mtp", "num_speculative_tokens": True}, "num_speculative_tokens must be an integer"),
        ({"method": "mtp"}, "'num_speculative_tokens' is required"),
        ({"method": "mtp", "num_speculative_tokens": 2, "draft_model": "x"}, "unknown key"),
        ({"method": "mtp", "num_speculative_tokens": 2, "rollback": "undo"}, "rollback must be one of"),
        ("mtp", "must be a dict"),
    ],
)
def test_bad_speculative_config(tiny, config, match):
    with pytest.raises(ValueError, match=match):
        LLM(tiny, speculative_config=config, kv_cache_memory_bytes=MEM)


def test_model_without_mtp_is_rejected():
    cfg = preset("tiny")
    cfg.num_nextn_predict_layers = 0
    with pytest.raises(ValueError, match="needs a model with MTP weights"):
        LLM(build(cfg), speculative_config=spec(2), kv_cache_memory_bytes=MEM)


def test_alias_method_name(tiny):
    assert SpeculativeConfig.from_dict({"method": "nemotron_h_mtp", "num_speculative_tokens": 2}).method == "mtp"
    llm = LLM(
        tiny, speculative_config={"method": "nemotron_h_mtp", "num_speculative_tokens": 2}, kv_cache_memory_bytes=MEM
    )
    assert llm.engine.k == 2


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "spec.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_speculative.py"), "--smoke", "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    for model in data["models"].values():
        assert {"0", "1"} <= set(model["k"])
        assert model["k"]["1"]["mean_acceptance_length"] >= 1.0


# ------------------------------------------------------------------------------------------ helpers


def run(engine) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def assert_pools_empty(engine) -> None:
    assert len(engine.cache.free_blocks) == engine.cache.num_blocks
    assert len(engine.cache.free_slots) == engine.config.max_num_seqs
    assert not engine.scheduler.running and not engine.scheduler.waiting


# ------------------------------------------------------------------------------------------ prompt logprobs


@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 7}])
def test_prompt_logprobs_equal_the_plain_engines(tiny, prompts, options):
    """Scored prompts (SamplingParams.prompt_logprobs) next to verify rows: the same entries as the plain engine's,
    and the greedy tokens unchanged. Both run the same float32 model; the speculative runner's prefill takes its
    own Mamba path (per-position states), whose sums may round differently: measured ≤ 5e-7 apart on O(5) logprobs,
    so 1e-5 is tight and still far below what a wrong row or token would move (O(1))."""
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, prompt_logprobs=2)
    got = LLM(tiny, speculative_config=spec(2), kv_cache_memory_bytes=MEM, **options).generate(
        [{"prompt_token_ids": p} for p in prompts], params
    )
    want = LLM(tiny, kv_cache_memory_bytes=MEM).generate([{"prompt_token_ids": p} for p in prompts], params)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert len(g.prompt_logprobs) == len(w.prompt_logprobs) and g.prompt_logprobs[0] is None
        for ge, we in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:]):
            assert ge.keys() == we.keys()
            for t in ge:
                assert ge[t].logprob == pytest.approx(we[t].logprob, abs=1e-5) and ge[t].rank == we[t].rank


def test_prefix_caching_structured_outputs_and_beam_search_are_refused(tiny):
    """They need what the drafter cannot give: cached blocks whose MTP K/V depend on the block's tokens alone,
    sampling through logits processors, and a step that leaves beams to the beam search."""
    with pytest.raises(ValueError, match="enable_prefix_caching is not supported by SpeculativeEngine"):
        SpeculativeEngine(tiny, config=EngineConfig(enable_prefix_caching=True), speculative_config=spec(1))
    engine = SpeculativeEngine(tiny, config=EngineConfig(), speculative_config=spec(1))
    with pytest.raises(ValueError, match="structured_outputs is not supported by SpeculativeEngine"):
        engine.add_request("r", [5, 6, 7], SamplingParams(structured_outputs={"choice": ["a"]}))
    with pytest.raises(ValueError, match="beam search is not supported by SpeculativeEngine"):
        engine.add_request("b", [5, 6, 7], BeamSearchParams(beam_width=2, max_tokens=3))
