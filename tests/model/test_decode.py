"""Cache consistency of our model alone: default Δ mode (no clamp, consistent across paths), float32.

Feeding a sequence through `model.new_cache(batch)` in any pieces — one token at a time, a prefix and
then a chunk, random splits — must give the logits of one full forward.

Tolerance: max|cached − full| ≤ 1e-4 · max|full| (max-abs relative to the logit scale). The two paths
differ only in float32 operation order (single recurrence step vs chunked scan, attention over a grown
K/V, conv continued from a state), measured ≤ ~1e-6 relative; any stale or mis-advanced state gives
errors of order 1e-2 … 1.
"""

from __future__ import annotations

import pytest
import torch

from tests.model.helpers import PARITY_CONFIGS, our_cached_logits, perturb_weights, random_ids, rel_max

TOL = 1e-4

# name → how to build it. The transformers-made checkpoints are random and perturbed (helpers.py);
# "tiny" is the package preset (with an MTP block), its weights perturbed the same way after loading:
# with the preset's own init (std 0.02, Δ ≈ 0.001…0.1) the SSM state moves the logits by < 1e-4, so a
# cache that never updated its SSM state would pass unnoticed.
MODELS = ["mixed_odd", "latent_moe_grouped", "mamba_only", "attention_only", "tiny"]


def load(path, **kwargs):
    import nemotron3

    return nemotron3.load_model(path, **kwargs)


@pytest.fixture(params=MODELS)
def model_and_ids(request, make_hf_checkpoint):
    name = request.param
    if name == "tiny":
        model = load("tiny")
        assert model.config.num_nextn_predict_layers > 0  # the MTP-carrying preset
        perturb_weights(model, seed=43)
        vocab, seq_len = model.config.vocab_size, 40
    else:
        pytest.importorskip("transformers")
        config, seq_len = PARITY_CONFIGS[name]
        directory, _ = make_hf_checkpoint(config, seed=41 + MODELS.index(name))
        model = load(directory)
        vocab = config.vocab_size
    assert model.config.dt_clamp == "checkpoint", "load_model's default Δ mode should be 'checkpoint'"
    ids = random_ids(vocab, 2, seq_len, seed=7)
    return name, model, ids


def check(name, what, cached, full):
    err = rel_max(cached, full)
    assert cached.shape == full.shape, f"{name} {what}: shape {tuple(cached.shape)} vs {tuple(full.shape)}"
    assert err <= TOL, f"{name} {what}: max|cached − full| / max|full| = {err:.3e} > {TOL:.0e}"


@torch.no_grad()
def test_token_by_token_equals_full_forward(model_and_ids):
    name, model, ids = model_and_ids
    full = model(ids).logits
    check(name, "token by token", our_cached_logits(model, ids, [1] * ids.shape[1]), full)


@torch.no_grad()
def test_prefix_then_chunk_equals_full_forward(model_and_ids):
    name, model, ids = model_and_ids
    full = model(ids).logits
    T = ids.shape[1]
    q = model.config.chunk_size
    for split in sorted({1, 3, q - 1, q, q + 3, T // 2, T - 1} & set(range(1, T))):
        check(name, f"prefix {split} + chunk {T - split}", our_cached_logits(model, ids, [split, T - split]), full)
    # prefix, a few decode steps, then a chunk, then decode again
    check(name, "mixed pieces", our_cached_logits(model, ids, [q + 1, 1, 1, T - q - 5, 1, 1]), full)


@torch.no_grad()
def test_random_splits_equal_full_forward(model_and_ids):
    name, model, ids = model_and_ids
    full = model(ids).logits
    T = ids.shape[1]
    gen = torch.Generator().manual_seed(8)
    for _ in range(3):
        cuts = sorted(torch.randperm(T - 1, generator=gen)[:6].add(1).tolist())
        pieces = [b - a for a, b in zip([0] + cuts, cuts + [T])]
        check(name, f"pieces {pieces}", our_cached_logits(model, ids, pieces), full)


@torch.no_grad()
def test_hidden_states_and_logits_to_keep_with_cache(model_and_ids):
    name, model, ids = model_and_ids
    full = model(ids)
    T, split = ids.shape[1], ids.shape[1] - 6
    cache = model.new_cache(2)
    first = model(ids[:, :split], cache=cache)
    last = model(ids[:, split:], cache=cache, logits_to_keep=1)
    assert cache.seq_len == T
    assert last.logits.shape == (2, 1, full.logits.shape[-1])
    check(name, "logits_to_keep=1 after a prefix", last.logits, full.logits[:, -1:])
    hidden = torch.cat([first.hidden_states, last.hidden_states], 1)
    check(name, "hidden_states", hidden, full.hidden_states)


@torch.no_grad()
def test_caches_and_batch_rows_are_independent(model_and_ids):
    """Two caches advanced alternately give what each gives alone; a batch row through a batched
    cache equals that row alone (nothing is shared across caches or sequences)."""
    name, model, ids = model_and_ids
    T = ids.shape[1]
    alone = [model(ids[i : i + 1]).logits for i in range(2)]
    caches = [model.new_cache(1), model.new_cache(1)]
    outs = [[], []]
    pieces = [T // 2] + [1] * (T - T // 2)
    start = 0
    for n in pieces:
        for i in (1, 0):  # interleave the two sequences
            outs[i].append(model(ids[i : i + 1, start : start + n], cache=caches[i]).logits)
        start += n
    for i in range(2):
        check(name, f"cache {i} interleaved with another", torch.cat(outs[i], 1), alone[i])
    batched = our_cached_logits(model, ids, pieces)
    for i in range(2):
        check(name, f"row {i} of a batched cache", batched[i : i + 1], alone[i])
