"""Test helpers: small ModelConfigs, random perturbed `transformers` checkpoints, error measures.

transformers (5.23) is a test-only dependency used as an oracle; every checkpoint here is built from
random weights on the spot (never downloaded).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from nemotron3.config import ModelConfig, pattern_to_kinds

# ------------------------------------------------------------------------------------------ configs


def small_config(pattern: str, **overrides) -> ModelConfig:
    """A small config (hidden 32) with every width spelled out; `overrides` replace any field."""
    # head_dim 12 ≠ hidden / heads = 8
    base = {
        "vocab_size": 97,
        "hidden_size": 32,
        "layers_block_type": pattern_to_kinds(pattern),
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 12,
        "intermediate_size": 40,
        "ssm_state_size": 8,
        "mamba_num_heads": 4,
        "mamba_head_dim": 8,
        "n_groups": 2,
        "conv_kernel": 4,
        "chunk_size": 8,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 24,
        "moe_shared_expert_intermediate_size": 32,
        "moe_latent_size": None,
        "routed_scaling_factor": 1.0,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "num_nextn_predict_layers": 0,
    }
    base.update(overrides)
    return ModelConfig(**base)


# name → (config, sequence length). Batch 2 everywhere.
PARITY_CONFIGS: dict[str, tuple[ModelConfig, int]] = {
    "mamba_only": (small_config("MMM", chunk_size=8), 37),  # 37 = 4·8 + 5
    "attention_only": (small_config("**", num_attention_heads=4, num_key_value_heads=2, head_dim=12), 29),
    "dense_mlp": (small_config("M-*-", chunk_size=16), 41),
    "moe": (small_config("ME*E", n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=1.0), 33),
    "latent_moe_grouped": (
        small_config(
            "MEM*E",
            hidden_size=64,
            moe_latent_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            chunk_size=16,
        ),
        50,
    ),
    "mixed_odd": (
        small_config(
            "M*EM-E*M",
            vocab_size=203,
            hidden_size=48,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=10,  # 6·10 ≠ 48
            mamba_num_heads=6,
            mamba_head_dim=6,
            n_groups=3,
            ssm_state_size=10,
            conv_kernel=3,
            chunk_size=7,
            intermediate_size=36,
            n_routed_experts=12,
            num_experts_per_tok=3,
            moe_intermediate_size=20,
            moe_shared_expert_intermediate_size=28,
            moe_latent_size=20,
            n_group=3,
            topk_group=2,
            routed_scaling_factor=1.7,
            norm_topk_prob=False,
        ),
        45,  # 45 = 6·7 + 3
    ),
}


# --------------------------------------------------------------------------------- HF checkpoints


def hf_config(config: ModelConfig):
    """The transformers NemotronHConfig with the same fields (fp32, eager-free defaults)."""
    from transformers import NemotronHConfig

    return NemotronHConfig(**config.to_dict())


@torch.no_grad()
def perturb_weights(
    model,
    seed: int,
    dt_bias_range: tuple[float, float] = (-4.0, -1.0),
    correction_bias_std: float = 0.1,
    D_std: float = 1.0,
) -> None:
    """Overwrite a NemotronH model's weights so that every term of the math matters.

    Works on the transformers model and on ours alike (it goes by parameter-name leaves, which are the
    same: dt_bias, A_log, D, *norm*.weight, embeddings, e_score_correction_bias, ...).

    * matrices (Linear, embeddings, conv, stacked experts): N(0, 1/fan_in) so every layer moves the
      residual stream by O(1) (the HF init's std 0.02 makes most mixers nearly invisible);
    * biases N(0, 0.1²); RMSNorm / gated-norm weights 1 + 0.1·N(0,1);
    * Mamba: dt_bias ~ U(dt_bias_range), A_log ~ U(−1, 1.5), D ~ N(0, D_std²) (D_std = 0 isolates the SSM);
    * router e_score_correction_bias ~ N(0, correction_bias_std²) (changes which experts win).
    """
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std=1.0):
        return torch.randn(shape, generator=g) * std

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "dt_bias":
            lo, hi = dt_bias_range
            p.copy_(torch.rand(p.shape, generator=g) * (hi - lo) + lo)
        elif leaf == "A_log":
            p.copy_(torch.rand(p.shape, generator=g) * 2.5 - 1.0)
        elif leaf == "D":
            p.copy_(normal(p.shape, D_std))
        elif "norm" in name and leaf == "weight":
            p.copy_(1.0 + normal(p.shape, 0.1))
        elif leaf == "bias":
            p.copy_(normal(p.shape, 0.1))
        elif "embeddings" in name:
            p.copy_(normal(p.shape))
        else:
            fan_in = p.shape[-1]  # Linear (out, in), conv (C, 1, K), experts (E, out, in)
            p.copy_(normal(p.shape, 1.0 / math.sqrt(fan_in)))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(normal(b.shape, correction_bias_std))


def random_hf_model(config: ModelConfig, seed: int = 0, **perturb):
    """A perturbed random transformers NemotronHForCausalLM (fp32, eval mode)."""
    from transformers import NemotronHForCausalLM

    torch.manual_seed(seed)  # transformers' own init uses the global generator
    model = NemotronHForCausalLM(hf_config(config)).eval()
    perturb_weights(model, seed, **perturb)
    return model


def save_random_hf_checkpoint(config: ModelConfig, directory: str | Path, seed: int = 0, **perturb):
    """Save a perturbed random transformers model with save_pretrained; returns the model."""
    model = random_hf_model(config, seed, **perturb)
    model.save_pretrained(str(directory))
    return model


# ---------------------------------------------------------------------------------------- running


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def hf_cached_logits(model, ids: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """transformers generate-style: feed `ids` in consecutive pieces of the given lengths through one
    `past_key_values` (a prefill, then chunks or single tokens). Returns the concatenated logits.

    The model needs at least one attention layer: transformers 5.23's cached forward asks the cache
    for its length, which raises for a cache holding only Mamba layers."""
    assert sum(pieces) == ids.shape[1]
    out, past, start = [], None, 0
    for n in pieces:
        res = model(input_ids=ids[:, start : start + n], past_key_values=past, use_cache=True)
        past = res.past_key_values
        out.append(res.logits.float())
        start += n
    return torch.cat(out, dim=1)


@torch.no_grad()
def our_cached_logits(model, ids: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """Our model: the same pieces through one `model.new_cache(batch)`; checks cache.seq_len."""
    assert sum(pieces) == ids.shape[1]
    cache = model.new_cache(ids.shape[0])
    out, start = [], 0
    for n in pieces:
        out.append(model(ids[:, start : start + n], cache=cache).logits)
        start += n
        assert cache.seq_len == start, f"cache.seq_len {cache.seq_len} after {start} tokens"
    return torch.cat(out, dim=1)


def random_ids(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel_l2(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """‖ours − ref‖ / ‖ref‖ in float64."""
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).norm() / ref.norm()).item()


def rel_max(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours − ref| / max|ref| (max-abs error relative to the logit scale)."""
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).abs().max() / ref.abs().max()).item()
