"""Parity with transformers 5.23 `NemotronHForCausalLM` on random, perturbed, locally saved checkpoints.

Every checkpoint is a randomly initialised transformers model whose weights are then perturbed so that
no term is trivially zero or one (tests/model/helpers.py: perturb_weights — dt_bias ∈ [−4, −1],
random A_log and D, norm weights 1 + 0.1·N(0,1), a correction bias that changes expert choices), saved
with `save_pretrained` and loaded with `nemotron3.load_model(dir, dt_clamp="transformers")`.

Tolerance: float32 logits with relative L2 error ‖ours − ref‖ / ‖ref‖ ≤ 1e-4 (the acceptance bar).
Both sides compute in float32 with different operation orders (chunked scan shapes, expert grouping,
SDPA vs einsum), so the expected error is a few float32 roundoffs amplified by depth, ~1e-7 … 1e-6;
1e-4 leaves room for that and still fails on any wrong term (those give ≥ 1e-3, see the dt test).
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.model.helpers import (
    PARITY_CONFIGS,
    hf_cached_logits,
    hf_logits,
    our_cached_logits,
    perturb_weights,
    random_ids,
    rel_l2,
    rel_max,
    small_config,
)

TOL = 1e-4


def load(path, **kwargs):
    import nemotron3

    return nemotron3.load_model(path, **kwargs)


def save_checkpoint(model, directory, **kwargs):
    from nemotron3.io.checkpoint import save_checkpoint as save

    save(model, model.config, directory, **kwargs)


def hf_from_pretrained(directory):
    model, info = transformers.NemotronHForCausalLM.from_pretrained(
        str(directory), dtype=torch.float32, output_loading_info=True
    )
    return model.eval(), info


# ------------------------------------------------------------------------------------- full forward


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
@torch.no_grad()
def test_logits_match_transformers(name, make_hf_checkpoint):
    config, seq_len = PARITY_CONFIGS[name]
    directory, hf = make_hf_checkpoint(config, seed=10 + list(PARITY_CONFIGS).index(name))
    model = load(directory, dt_clamp="transformers")
    assert not model.training, "load_model must return a model in eval mode"
    ids = random_ids(config.vocab_size, 2, seq_len, seed=1)
    ref = hf_logits(hf, ids)
    assert ref.std(dim=1).mean() > 0.1, "degenerate oracle: logits barely change along the sequence"
    out = model(ids)
    assert out.logits.dtype == torch.float32 and out.logits.shape == ref.shape
    err = rel_l2(out.logits, ref)
    assert err <= TOL, f"{name}: logits rel L2 error {err:.3e} > {TOL:.0e} (rel max {rel_max(out.logits, ref):.3e})"
    # hidden_states: after norm_f, as transformers' last_hidden_state
    hf_hidden = hf.model(input_ids=ids, use_cache=False).last_hidden_state
    err_h = rel_l2(out.hidden_states, hf_hidden)
    assert err_h <= TOL, f"{name}: hidden_states rel L2 error {err_h:.3e}"
    # logits_to_keep: only the last positions
    kept = model(ids, logits_to_keep=3).logits
    assert kept.shape == (2, 3, config.vocab_size)
    assert rel_l2(kept, ref[:, -3:]) <= TOL


@torch.no_grad()
def test_moe_routing_in_parity_configs_is_non_trivial(make_hf_checkpoint):
    """Guard for the parity test itself: the correction bias changes which experts win for some tokens
    and the group limit excludes experts, so a router that ignored either would fail parity."""
    config, seq_len = PARITY_CONFIGS["latent_moe_grouped"]
    _, hf = make_hf_checkpoint(config, seed=10 + list(PARITY_CONFIGS).index("latent_moe_grouped"))
    ids = random_ids(config.vocab_size, 2, seq_len, seed=1)
    captured = {}
    gate = hf.model.layers[1].mixer.gate

    def keep_input(module, inputs, output):
        captured["x"] = inputs[0]

    hook = gate.register_forward_hook(keep_input)
    hf_logits(hf, ids)
    hook.remove()
    scores = torch.sigmoid(torch.nn.functional.linear(captured["x"].float(), gate.weight.float()))
    plain = scores.topk(2, dim=-1).indices.sort(-1).values
    biased = (scores + gate.e_score_correction_bias).topk(2, dim=-1).indices.sort(-1).values
    assert (plain != biased).any(dim=-1).float().mean() > 0.02


# ------------------------------------------------------------------------------ cache vs HF's cache

# (config name, pieces): a prefill, then single tokens and chunks through one cache
CACHE_CASES = [
    ("mixed_odd", [17] + [1] * 10 + [9] + [1] * 9),
    ("latent_moe_grouped", [20] + [1] * 12 + [18]),
    ("attention_only", [7, 1, 1, 13, 1, 1, 5]),
    ("dense_mlp", [16, 1, 1, 1, 1, 21]),
]


@pytest.mark.parametrize("name,pieces", CACHE_CASES, ids=[c[0] for c in CACHE_CASES])
@torch.no_grad()
def test_cached_decode_matches_transformers_cache(name, pieces, make_hf_checkpoint):
    """transformers generate-style (prefill, then steps through past_key_values) vs our cache path,
    both in the transformers Δ-clamp mode."""
    config, seq_len = PARITY_CONFIGS[name]
    assert sum(pieces) == seq_len
    directory, hf = make_hf_checkpoint(config, seed=17)
    model = load(directory, dt_clamp="transformers")
    ids = random_ids(config.vocab_size, 2, seq_len, seed=2)
    ref = hf_cached_logits(hf, ids, pieces)
    ours = our_cached_logits(model, ids, pieces)
    err = rel_l2(ours, ref)
    assert err <= TOL, f"{name}: cached logits rel L2 error {err:.3e} (rel max {rel_max(ours, ref):.3e})"


# ------------------------------------------------------------------------------------ the Δ clamp

DT_CONFIG = small_config("M*M", chunk_size=8)  # an attention layer so that transformers can use a cache
DT_LEN = 37


@pytest.fixture
def clamped_checkpoint(make_hf_checkpoint):
    """dt_bias ≈ −8 ⇒ Δ = softplus(dt + dt_bias) ≈ 3e-4 < time_step_min = 1e-3: the clamp binds.
    D = 0 so that the Mamba output is the SSM term alone (the D·x skip would otherwise dilute Δ's effect)."""
    return make_hf_checkpoint(DT_CONFIG, seed=3, dt_bias_range=(-8.5, -7.5), D_std=0.0)


@torch.no_grad()
def test_dt_clamp_switch_matters(clamped_checkpoint):
    directory, hf = clamped_checkpoint
    ids = random_ids(DT_CONFIG.vocab_size, 2, DT_LEN, seed=4)
    ref = hf_logits(hf, ids)
    hf_mode = load(directory, dt_clamp="transformers")
    default = load(directory)
    err_hf_mode = rel_l2(hf_mode(ids).logits, ref)
    full_default = default(ids).logits
    err_default = rel_l2(full_default, ref)
    assert err_hf_mode <= TOL, f"dt_clamp='transformers' vs HF prefill: {err_hf_mode:.3e}"
    # measured ≈ 0.24: the clamp changes the result by far more than the parity tolerance
    assert err_default > 100 * TOL, f"default mode should not clamp Δ, yet it matches HF prefill ({err_default:.3e})"
    # the default mode is self-consistent: prefill == token-by-token decode
    steps = our_cached_logits(default, ids, [1] * DT_LEN)
    assert rel_max(steps, full_default) <= TOL, f"default prefill vs decode: rel max {rel_max(steps, full_default):.3e}"
    # transformers' own inconsistency, reproduced: its prefill clamps, its decode does not
    pieces = [5] + [1] * (DT_LEN - 5)
    hf_steps = hf_cached_logits(hf, ids, pieces)
    ours_steps = our_cached_logits(hf_mode, ids, pieces)
    assert rel_l2(hf_steps, ref) > 100 * TOL  # measured ≈ 0.2
    err_steps = rel_l2(ours_steps, hf_steps)
    assert err_steps <= TOL, f"dt_clamp='transformers' decode vs HF decode: {err_steps:.3e}"


@torch.no_grad()
def test_dt_clamp_transformers_one_token_prompt(clamped_checkpoint):
    """A one-token first forward on an empty cache is *prefill* for transformers 5.23 (its layers have no
    state yet, so it takes the chunked path, which clamps Δ); only later single tokens are decode."""
    directory, hf = clamped_checkpoint
    ids = random_ids(DT_CONFIG.vocab_size, 2, DT_LEN, seed=4)
    hf_mode = load(directory, dt_clamp="transformers")
    pieces = [1] * DT_LEN
    ref = hf_cached_logits(hf, ids, pieces)
    ours = our_cached_logits(hf_mode, ids, pieces)
    err = rel_l2(ours, ref)
    assert err <= TOL, (
        f"dt_clamp='transformers', one token at a time from an empty cache: rel L2 {err:.3e} vs transformers "
        f"(first position alone: {rel_l2(ours[:, :1], ref[:, :1]):.3e})"
    )


# ------------------------------------------------------------------------------------- round trip


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("source", ["mixed_odd", "latent_moe_grouped", "tiny"])
@torch.no_grad()
def test_checkpoint_round_trip(source, make_hf_checkpoint, tmp_path):
    """load → save_checkpoint → load gives identical tensors; transformers loads our checkpoint and
    agrees with us (and, for a transformers-made source, has exactly the original weights)."""
    if source == "tiny":
        hf_orig = None
        first = load("tiny", dt_clamp="transformers")  # carries an MTP block
        perturb_weights(first, seed=19)  # so that transformers' logits test every term, not just the init
        config = first.config
        seq_len = 40
    else:
        config, seq_len = PARITY_CONFIGS[source]
        directory, hf_orig = make_hf_checkpoint(config, seed=23)
        first = load(directory, dt_clamp="transformers")
    out_dir = tmp_path / "ours"
    save_checkpoint(first, out_dir)
    second = load(out_dir, dt_clamp="transformers")
    a, b = _state(first), _state(second)
    assert a.keys() == b.keys(), f"keys differ: {sorted(a.keys() ^ b.keys())[:10]}"
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} changed in the round trip"
    if source == "tiny":
        assert any(k.startswith("mtp.") for k in a), "tiny preset should carry an MTP block"

    ids = random_ids(config.vocab_size, 2, seq_len, seed=5)
    ours = first(ids).logits
    assert torch.equal(second(ids).logits, ours)

    hf, info = hf_from_pretrained(out_dir)
    assert not info["missing_keys"], f"transformers missed {sorted(info['missing_keys'])[:10]}"
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith("mtp.")]
    assert not unexpected, f"transformers did not expect {unexpected[:10]}"
    err = rel_l2(ours, hf_logits(hf, ids))
    assert err <= TOL, f"transformers on our checkpoint vs us: rel L2 {err:.3e}"
    if hf_orig is not None:  # the weights went HF → ours → HF unchanged
        orig = hf_orig.state_dict()
        for k, v in hf.state_dict().items():
            assert torch.equal(v, orig[k]), f"transformers tensor {k} differs after our round trip"


@torch.no_grad()
def test_saved_names_match_transformers_save_pretrained(make_hf_checkpoint, tmp_path):
    """Our checkpoint has exactly the tensor names and shapes transformers writes (hub format, §9)."""
    from safetensors import safe_open

    config, _ = PARITY_CONFIGS["mixed_odd"]
    directory, _ = make_hf_checkpoint(config, seed=29)
    model = load(directory)
    save_checkpoint(model, tmp_path / "ours")

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                    out[k] = tuple(fh.get_slice(k).get_shape())
        return out

    theirs, ours = tensors(directory), tensors(tmp_path / "ours")
    assert ours == theirs, f"name/shape mismatch: {sorted(set(ours.items()) ^ set(theirs.items()))[:10]}"
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "nemotron_h"
    assert "dt_clamp" not in saved, "the runtime Δ-clamp switch must not be written to config.json"


@torch.no_grad()
def test_sharded_checkpoint_loads_in_both(make_hf_checkpoint, tmp_path):
    config, seq_len = PARITY_CONFIGS["latent_moe_grouped"]
    directory, hf_orig = make_hf_checkpoint(config, seed=31)
    model = load(directory, dt_clamp="transformers")
    out_dir = tmp_path / "sharded"
    save_checkpoint(model, out_dir, max_shard_size=40_000)  # bytes; the model is ~190 kB in fp32
    shards = sorted(out_dir.glob("*.safetensors"))
    assert len(shards) > 1, "max_shard_size did not shard"
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    assert {p.name for p in shards} == set(index["weight_map"].values())
    again = load(out_dir, dt_clamp="transformers")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    hf, info = hf_from_pretrained(out_dir)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = random_ids(config.vocab_size, 2, seq_len, seed=6)
    assert torch.equal(hf_logits(hf, ids), hf_logits(hf_orig, ids))
