"""Sampler: distributions against exact probabilities on a small vocabulary, seeds, penalties, validation."""

import dataclasses
import math

import pytest
import torch

from nemotron3.engine.sampler import SamplingTensors, apply_penalties, sample
from nemotron3.engine.sampling_params import SamplingParams

V = 8
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def expected(params: SamplingParams) -> torch.Tensor:
    """The exact distribution the sampler must draw from, computed the slow obvious way (float64)."""
    p = (LOGITS.double() / params.temperature).softmax(-1)
    keep = torch.ones(V, dtype=torch.bool)
    if params.min_p > 0:
        keep &= p >= params.min_p * p.max()
    if params.top_k > 0:
        keep &= p >= p.sort(descending=True).values[params.top_k - 1]
    p = torch.where(keep, p, 0.0)
    p = p / p.sum()
    if params.top_p < 1:
        order = p.argsort(descending=True)
        mass, kept = 0.0, torch.zeros(V, dtype=torch.bool)
        for i in order.tolist():
            if mass >= params.top_p:
                break
            kept[i] = True
            mass += p[i].item()
        p = torch.where(kept, p, 0.0)
        p = p / p.sum()
    return p


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=3),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=1.0, min_p=0.2),
        SamplingParams(temperature=0.9, top_k=5, top_p=0.9, min_p=0.05),
    ],
)
def test_empirical_distribution_matches_exact(params):
    n = 40_000
    rows = 2_000
    t = SamplingTensors.build([params] * rows, [None] * rows)
    torch.manual_seed(1234)
    counts = torch.zeros(V)
    for _ in range(n // rows):
        tokens = sample(LOGITS.expand(rows, V).clone(), t).token_ids
        counts += torch.bincount(tokens, minlength=V).float()
    freq = counts / n
    p = expected(params).float()
    # binomial standard error sqrt(p(1-p)/n) ≤ 0.0025 at n=40k; 5 sigma keeps false alarms below 1e-5
    sigma = (p * (1 - p) / n).sqrt()
    assert torch.all((freq - p).abs() <= 5 * sigma + 1e-9), (freq, p)
    assert torch.all(freq[p == 0] == 0)  # masked tokens are never drawn


@pytest.mark.parametrize(
    "params, edited",
    [
        (
            SamplingParams(temperature=1.0, logit_bias={7: 4.0, 0: -1.5}),
            LOGITS + torch.tensor([-1.5, 0, 0, 0, 0, 0, 0, 4.0]),
        ),
        (SamplingParams(temperature=0.8, top_k=2, allowed_token_ids=[6, 3, 5]),
         torch.tensor([-torch.inf, -torch.inf, -torch.inf, 0.5, -torch.inf, -0.5, -1.0, -torch.inf])),
        (SamplingParams(temperature=1.0, allowed_token_ids=[1, 4], logit_bias={4: 2.0, 2: 9.0}),
         torch.tensor([-torch.inf, 1.5, -torch.inf, -torch.inf, 2.0, -torch.inf, -torch.inf, -torch.inf])),
    ],
)
def test_logit_edits_sample_from_the_edited_distribution(params, edited):
    """logit_bias / allowed_token_ids: draws follow softmax of the edited logits (then temperature and top-k), and
    logprobs stay the raw model's."""
    n, rows = 40_000, 2_000
    t = SamplingTensors.build([dataclasses.replace(params, logprobs=0)] * rows, [None] * rows)
    torch.manual_seed(4321)
    counts = torch.zeros(V)
    for _ in range(n // rows):
        res = sample(LOGITS.expand(rows, V).clone(), t)
        counts += torch.bincount(res.token_ids, minlength=V).float()
    assert torch.allclose(res.logprobs, LOGITS.log_softmax(-1)[res.token_ids])
    p = (edited.double() / params.temperature).softmax(-1)
    if params.top_k > 0:
        p = torch.where(p >= p.sort(descending=True).values[params.top_k - 1], p, 0.0)
        p = p / p.sum()
    p, freq = p.float(), counts / n
    sigma = (p * (1 - p) / n).sqrt()  # as above: 5 binomial standard errors
    assert torch.all((freq - p).abs() <= 5 * sigma + 1e-9), (freq, p)
    assert torch.all(freq[p == 0] == 0)


def test_draw_inverts_unnormalised_rows_and_never_picks_an_empty_interval():
    """Zero-probability tokens at both ends and in the middle (empty CDF intervals) are never drawn; the others come
    with their share of the row's total, which need not be 1."""
    from nemotron3.engine.sampler import draw

    probs = torch.tensor([0.0, 2.0, 0.0, 0.0, 6.0, 0.0]).expand(20_000, 6)
    torch.manual_seed(5)
    counts = torch.bincount(draw(probs, [None] * 20_000), minlength=6).float()
    p = torch.tensor([0.0, 0.25, 0.0, 0.0, 0.75, 0.0])
    sigma = (p * (1 - p) / 20_000).sqrt()  # 5 binomial standard errors, as above
    assert torch.all((counts / 20_000 - p).abs() <= 5 * sigma) and torch.all(counts[p == 0] == 0)
    seeded = [draw(probs[:2], [torch.Generator().manual_seed(3), None])[0].item() for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_seeded_rows_reproduce_and_unseeded_rows_do_not_interfere():
    params = SamplingParams(temperature=1.0, seed=7)
    runs = []
    for other_seed in (0, 1):
        torch.manual_seed(other_seed)  # the global RNG must not affect a seeded row
        gens = [torch.Generator().manual_seed(7), None]
        t = SamplingTensors.build([params, SamplingParams()], gens)
        runs.append([sample(LOGITS.expand(2, V).clone(), t).token_ids[0].item() for _ in range(50)])
    assert runs[0] == runs[1]


def test_greedy_rows_mixed_with_sampled_rows():
    t = SamplingTensors.build([SamplingParams(temperature=0.0), SamplingParams(temperature=5.0)], [None, None])
    torch.manual_seed(0)
    tokens = [sample(LOGITS.expand(2, V).clone(), t).token_ids.tolist() for _ in range(200)]
    assert all(row[0] == 0 for row in tokens)
    assert len({row[1] for row in tokens}) > 3


def test_penalties_exact_math():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    counts = torch.tensor([[2, 1, 0, 0]])
    prompt = torch.tensor([[False, False, False, True]])
    t = SamplingTensors.build([SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)], [None])
    out = apply_penalties(logits, counts, prompt, t)
    # token 0: 2/2 − 0.5 − 0.25·2; token 1: −1·2 − 0.5 − 0.25; token 2: unseen; token 3: prompt only → 3/2
    torch.testing.assert_close(out, torch.tensor([[0.0, -2.75, 0.5, 1.5]]))


def test_logprobs_are_raw_model_logprobs():
    t = SamplingTensors.build([SamplingParams(temperature=0.0, logprobs=3)], [None])
    res = sample(LOGITS[None].clone(), t)
    ref = LOGITS.log_softmax(-1)
    assert res.token_ids.item() == 0
    assert math.isclose(res.logprobs.item(), ref[0].item(), rel_tol=1e-6)
    assert res.top_ids.tolist() == [[0, 1, 2]]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"logprobs": -1}, "logprobs"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"logit_bias": {5: float("nan")}}, "logit_bias"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [3, -2]}, "allowed_token_ids"),
    ],
)
def test_bad_params_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name} "):
        SamplingParams(**kwargs)


def test_argmax_ids_takes_the_first_maximum_and_counts_nan_as_the_maximum():
    """The numpy fast path of greedy decoding agrees with torch.argmax, ties and NaN included."""
    from nemotron3.engine.sampler import argmax_ids

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1000, generator=g)
    logits[1, 10] = logits[1, 700] = 50.0  # a tie: the first wins
    logits[2, 3] = float("nan")
    logits[3] = -float("inf")
    assert argmax_ids(logits) == logits.argmax(-1).tolist()
    assert argmax_ids(logits)[1:3] == [10, 3]
