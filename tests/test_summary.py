"""Model summary: published parameter counts, the closed-form formulas of architecture.md §12.1 as an
independent reference, weight-memory estimates, and KV/Mamba cache sizes (§5.5, §12.3)."""

import random

import pytest
import torch

from nemotron3.config import ATTENTION, MAMBA, MLP, MOE, ModelConfig, pattern_to_kinds, preset
from nemotron3.model.nemotron import NemotronHForCausalLM
from nemotron3.summary import census, classify, summarize

GiB, MiB = 2**30, 2**20
ONE_M = 2**20  # 1M context = 1,048,576 tokens


# --------------------------------------------------------------------------------------------- reference


def layer_params(c: ModelConfig, kind: str) -> tuple[int, int]:
    """(total, active) parameters of one layer incl. its block norm — architecture.md §12.1, plus biases."""
    H = c.hidden_size
    if kind == MAMBA:
        I, G, N, nh, K = c.mamba_inner_size, c.n_groups, c.ssm_state_size, c.mamba_num_heads, c.conv_kernel
        C = I + 2 * G * N
        rows = 2 * I + 2 * G * N + nh
        n = H * rows + C * K + 3 * nh + I + I * H + H
        n += C if c.use_conv_bias else 0
        n += rows + H if c.use_bias else 0  # in_proj and out_proj biases
        return n, n
    if kind == ATTENTION:
        nq, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        n = H * nq * d + 2 * H * nkv * d + nq * d * H + H
        return n, n
    if kind == MLP:
        M = c.intermediate_size
        n = 2 * H * M + H + (M + H if c.mlp_bias else 0)
        return n, n
    assert kind == MOE
    E, k, F, L = c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.moe_latent_size
    S = c.moe_shared_expert_intermediate_size
    fixed = E * H + E + 2 * H * S + H + (S + H if c.mlp_bias else 0)
    if L is not None:
        fixed += 2 * H * L + (L + H if c.mlp_bias else 0)
    width = L or H
    return fixed + E * 2 * width * F, fixed + k * 2 * width * F


def formula_counts(c: ModelConfig) -> dict[str, int]:
    """total / active (incl. and excl. embedding) / MTP totals by the closed-form formulas."""
    V, H = c.vocab_size, c.hidden_size
    layers = [layer_params(c, kind) for kind in c.layers_block_type]
    total = 2 * V * H + H + sum(t for t, _ in layers)
    active = 2 * V * H + H + sum(a for _, a in layers)
    block = [layer_params(c, kind) for kind in c.mtp_layers_block_type]
    mtp_fixed = 2 * H + 2 * H * H + H  # enorm, hnorm, eh_proj, final_layernorm
    D = c.num_nextn_predict_layers
    return {
        "total": total,
        "active": active,
        "active_excl_embedding": active - V * H,
        "mtp": D * (mtp_fixed + sum(t for t, _ in block)),
        "mtp_active": D * (mtp_fixed + sum(a for _, a in block)),
    }


def summary_counts(c: ModelConfig) -> dict[str, int]:
    s = summarize(c)
    return {
        "total": s.total_params,
        "active": s.active_params,
        "active_excl_embedding": s.active_params_excl_embedding,
        "mtp": s.mtp_params,
        "mtp_active": s.mtp_active_params,
    }


def random_config(rng: random.Random) -> ModelConfig:
    """A small valid config exercising latent/no latent, `-` layers, biases and 0–2 MTP blocks."""
    G = rng.choice([1, 2, 4])
    nkv = rng.choice([1, 2])
    E = rng.choice([4, 8, 16])
    return ModelConfig(
        vocab_size=rng.randrange(50, 500), hidden_size=rng.choice([32, 48, 64]),
        layers_block_type=pattern_to_kinds("".join(rng.choice("M*E-") for _ in range(rng.randrange(1, 9)))),
        num_key_value_heads=nkv, num_attention_heads=nkv * rng.choice([1, 2, 4]), head_dim=rng.choice([8, 16]),
        intermediate_size=rng.randrange(8, 100), ssm_state_size=rng.choice([8, 16]),
        mamba_num_heads=G * rng.choice([1, 2, 4]), mamba_head_dim=rng.choice([4, 8]), n_groups=G,
        conv_kernel=rng.choice([2, 4]), use_conv_bias=rng.random() < 0.5, use_bias=rng.random() < 0.5,
        mlp_bias=rng.random() < 0.5, n_routed_experts=E, num_experts_per_tok=rng.randrange(1, E + 1),
        moe_intermediate_size=rng.randrange(4, 40), moe_shared_expert_intermediate_size=rng.randrange(4, 40),
        moe_latent_size=rng.choice([None, 16, 24]), num_nextn_predict_layers=rng.choice([0, 1, 2]),
        mtp_layers_block_type=pattern_to_kinds("".join(rng.choice("*E-") for _ in range(rng.randrange(1, 4)))),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- counts


def test_nano_matches_published_counts():
    s = summarize(preset("nano-30b-a3b"))
    assert s.total_params == 31_577_940_288
    assert abs(s.total_params / 31.6e9 - 1) < 1e-3  # model card: 31.6B
    assert s.active_params_excl_embedding == 3_227_754_816  # card: 3.2B
    assert s.active_params == 3_580_076_352  # card: 3.6B incl. embeddings
    assert s.mtp_params == 0 and s.mtp_blocks == 0 and s.mtp_pattern == ""
    assert s.layer_counts == {"mamba": 23, "attention": 6, "moe": 23, "mlp": 0}
    assert s.pattern == "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"


def test_super_matches_published_counts():
    s = summarize(preset("super-120b-a12b"))
    assert s.total_params == 120_668_707_840
    assert s.active_params_excl_embedding == 12_233_366_528
    assert s.active_params == 12_770_237_440
    assert s.mtp_params == 2_942_325_248
    assert s.layer_counts == {"mamba": 40, "attention": 8, "moe": 40, "mlp": 0}
    assert s.mtp_pattern == "*E" and s.mtp_blocks == 1


def test_ultra_matches_550b_a55b():
    s = summarize(preset("ultra-550b-a55b"))
    assert abs(s.total_params / 550e9 - 1) < 0.01 and abs(s.active_params_excl_embedding / 55e9 - 1) < 0.01
    assert round(s.total_params / 1e7) == 54931  # §12.3: 549.31B
    assert round(s.active_params_excl_embedding / 1e7) == 5499  # §12.3: 54.99B
    assert round(s.mtp_params / 1e7) == 1122  # §12.3: MTP block 11.22B
    # the full BF16 checkpoint (main + MTP) is the published "1,121 GB" (research/nvfp4.md §5)
    bf16 = next(w for w in s.weight_memory if w.format == "bf16")
    assert abs(bf16.bytes_with_mtp / 1121e9 - 1) < 1e-3


@pytest.mark.parametrize("name", ["tiny", "nano-30b-a3b", "super-120b-a12b", "ultra-550b-a55b"])
def test_presets_match_formula(name):
    c = preset(name)
    assert summary_counts(c) == formula_counts(c)


def test_random_configs_match_formula():
    rng = random.Random(1234)
    seen = set()
    for _ in range(40):
        c = random_config(rng)
        seen |= {("latent", c.moe_latent_size is not None), ("bias", c.use_bias), ("mlp_bias", c.mlp_bias)}
        seen |= {("mlp", MLP in c.layers_block_type), ("mtp", c.num_nextn_predict_layers)}
        assert summary_counts(c) == formula_counts(c), c
    assert {("latent", True), ("latent", False), ("bias", True), ("mlp_bias", True), ("mlp", True), ("mtp", 2)} <= seen


def test_tiny_matches_a_real_model():
    """The meta-device census equals the numel of an allocated tiny model (parameters + the router buffer)."""
    c = preset("tiny")
    model = NemotronHForCausalLM(c)
    real = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    s = summarize(c)
    assert s.total_params + s.mtp_params == real
    assert s.total_params == 172_672  # architecture.md §9.2 (HF state dict incl. buffer)
    on_disk = sum(t.matrices if t.routed else 1 for t in census(c) if not t.mtp)
    assert on_disk == 75  # §9.2: 75 main tensors in the checkpoint, one per expert
    assert sum(s.params_by_part.values()) == s.total_params


def test_active_counts_k_of_E_routed_experts_only():
    c = preset("tiny")
    s = summarize(c)
    routed = s.params_by_part["moe_routed_experts"]
    assert routed == 2 * c.n_routed_experts * 2 * c.moe_latent_size * c.moe_intermediate_size  # 2 E layers
    inactive = routed * (c.n_routed_experts - c.num_experts_per_tok) // c.n_routed_experts
    assert s.total_params - s.active_params == inactive
    assert s.active_params - s.active_params_excl_embedding == s.embedding_params == c.vocab_size * c.hidden_size


def test_classify_names():
    c = preset("tiny")
    t = classify("backbone.layers.1.mixer.experts.up_proj", (8, 32, 32), c)
    assert t.routed and t.linear and t.part == "moe_routed_experts" and t.matrices == 8
    t = classify("backbone.layers.1.mixer.gate.e_score_correction_bias", (8,), c)
    assert t.fp32 and not t.linear and t.part == "moe"
    assert classify("backbone.layers.1.mixer.gate.weight", (8, 64), c).linear is False  # router stays bf16
    assert classify("backbone.layers.0.mixer.in_proj.weight", (328, 64), c).linear
    assert not classify("backbone.layers.0.mixer.in_proj.bias", (328,), c).linear
    assert not classify("backbone.layers.0.mixer.conv1d.weight", (192, 1, 4), c).linear
    assert classify("lm_head.weight", (256, 64), c).linear is False
    t = classify("mtp.layers.0.eh_proj.weight", (64, 128), c)
    assert t.mtp and t.linear and t.part == "mtp"
    with pytest.raises(ValueError, match="unexpected tensor name"):
        classify("model.embed_tokens.weight", (256, 64), c)
    with pytest.raises(ValueError, match="beyond"):
        classify("backbone.layers.6.norm.weight", (64,), c)


# --------------------------------------------------------------------------------------------- memory


def test_weight_memory_nano_by_hand():
    """Nano: non-linear tensors (embeddings, lm_head, norms, conv, A/D/dt, router) vs linear matrices."""
    c = preset("nano-30b-a3b")
    s = summarize(c)
    V, H, E, nh = c.vocab_size, c.hidden_size, c.n_routed_experts, c.mamba_num_heads
    I, C, K = c.mamba_inner_size, c.mamba_conv_dim, c.conv_kernel
    nM, nA, nE = 23, 6, 23
    bf16_rest = 2 * V * H + H + 52 * H + nM * (C * K + C + I) + nE * E * H  # 2-byte non-linear tensors
    fp32_rest = nM * 3 * nh + nE * E  # A_log, D, dt_bias; router bias
    linear = s.total_params - bf16_rest - fp32_rest
    matrices = nM * 2 + nA * 4 + nE * (2 + 2 * E)
    rest = 2 * bf16_rest + 4 * fp32_rest
    got = {w.format: w.bytes for w in s.weight_memory}
    assert got["bf16"] == rest + 2 * linear
    assert got["fp8"] == rest + linear + 4 * matrices
    assert got["nvfp4"] == rest + linear * 9 // 16 + 4 * matrices
    assert all(w.bytes == w.bytes_with_mtp and w.assumption for w in s.weight_memory)  # no MTP in Nano
    assert 1.99 < got["bf16"] / s.total_params < 2.01 and got["nvfp4"] < got["fp8"] < got["bf16"]


def test_cache_memory_nano():
    s = summarize(preset("nano-30b-a3b"))
    assert s.kv_bytes_per_token == 6 * 2 * 2 * 128 * 2
    one_m = next(r for r in s.contexts if r.tokens == ONE_M)
    assert one_m.kv_bytes == 6 * GiB and one_m.mtp_kv_bytes == 0
    assert s.ssm_state_bytes == 46 * MiB  # 23 layers × 64·64·128 fp32
    assert s.conv_state_bytes == 23 * 6144 * 3 * 2 and s.conv_state_bytes < MiB  # "~1 MiB"
    assert [r.tokens for r in s.contexts] == [8192, 131072, ONE_M]
    assert all(r.mamba_state_bytes == s.ssm_state_bytes + s.conv_state_bytes for r in s.contexts)
    assert one_m.total_bytes == one_m.kv_bytes + one_m.mamba_state_bytes


def test_cache_memory_super_and_ultra():
    s = summarize(preset("super-120b-a12b"))
    one_m = s.contexts[-1]
    assert one_m.kv_bytes == 8 * GiB and one_m.mtp_kv_bytes == 1 * GiB  # MTP's own attention layer
    assert s.ssm_state_bytes == 160 * MiB
    assert 2 * MiB < s.conv_state_bytes < 3 * MiB  # "~3 MiB" (40 × 10240 × 3 × 2 B)
    assert one_m.total_bytes == 9 * GiB + s.ssm_state_bytes + s.conv_state_bytes
    u = summarize(preset("ultra-550b-a55b"))
    assert u.contexts[-1].kv_bytes == 12 * GiB and u.ssm_state_bytes == 384 * MiB


def test_ssm_cache_dtype_and_custom_contexts():
    c = preset("nano-30b-a3b").replace(mamba_ssm_cache_dtype="bfloat16")
    s = summarize(c, contexts=(1000,))
    assert s.ssm_state_bytes == 23 * MiB
    assert [r.tokens for r in s.contexts] == [1000] and s.contexts[0].kv_bytes == 1000 * 6144


def test_census_of_ultra_is_shapes_only():
    """Ultra (560B parameters, 2.2 TB in fp32) is built on the meta device: only shapes come back."""
    tensors = census(preset("ultra-550b-a55b"))
    assert sum(t.numel for t in tensors) == 560_524_603_904
    assert torch.empty(0).device.type == "cpu"  # the meta device context did not leak
