"""ModelConfig: every config.json spelling, validation errors that name the field, presets, HF round trip."""

import json
import math

import pytest
from transformers import NemotronHConfig

from nemotron3.config import ATTENTION, MAMBA, MLP, MOE, PRESETS, ModelConfig, preset


def hub_style_dict(**over):
    """A config.json as NVIDIA ships it (transformers 4.5x era): pattern strings and num_hidden_layers."""
    d = {
        "model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"], "vocab_size": 300, "hidden_size": 64,
        "hybrid_override_pattern": "M*E-", "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "mamba_num_heads": 8, "mamba_head_dim": 16,
        "ssm_state_size": 16, "n_groups": 2, "n_routed_experts": 8, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "moe_shared_expert_intermediate_size": 48, "intermediate_size": 96,
        "rope_theta": 10000, "torch_dtype": "bfloat16", "mtp_hybrid_override_pattern": "*E",
        "num_nextn_predict_layers": 1,
    }  # fmt: skip
    d.update(over)
    return d


def test_pattern_string_spelling():
    cfg = ModelConfig.from_dict(hub_style_dict())
    assert cfg.layers_block_type == [MAMBA, ATTENTION, MOE, MLP]
    assert cfg.hybrid_override_pattern == "M*E-" and cfg.num_hidden_layers == 4
    assert cfg.mtp_layers_block_type == [ATTENTION, MOE]
    assert cfg.extra["rope_theta"] == 10000 and cfg.extra["torch_dtype"] == "bfloat16"


def test_list_spellings_new_and_legacy_names():
    new = hub_style_dict(layers_block_type=["linear_attention", "full_attention", "moe", "mlp"])
    legacy = hub_style_dict(layers_block_type=["mamba", "attention", "moe", "mlp"], mtp_layers_block_type=["attention", "moe"])
    for d in (new, legacy):
        del d["hybrid_override_pattern"]
        assert ModelConfig.from_dict(d).hybrid_override_pattern == "M*E-"


def test_list_wins_over_pattern():
    d = hub_style_dict(layers_block_type=["mamba", "moe"], num_hidden_layers=2)
    assert ModelConfig.from_dict(d).hybrid_override_pattern == "ME"


def test_legacy_mamba_keys():
    d = hub_style_dict(mamba_n_groups=4, mamba_d_conv=3, mamba_chunk_size=32, mamba_dt_min=0.002,
                       mamba_dt_max=0.2, mamba_dt_limit=[0.0, 5.0], mamba_conv_bias=False, num_local_experts=16)  # fmt: skip
    del d["n_groups"], d["n_routed_experts"]
    cfg = ModelConfig.from_dict(d)
    assert (cfg.n_groups, cfg.conv_kernel, cfg.chunk_size) == (4, 3, 32)
    assert (cfg.time_step_min, cfg.time_step_max, cfg.time_step_limit) == (0.002, 0.2, (0.0, 5.0))
    assert cfg.use_conv_bias is False and cfg.n_routed_experts == 16


def test_json_round_trip_with_infinity(tmp_path):
    cfg = ModelConfig.from_dict(hub_style_dict())
    cfg.to_json(tmp_path)
    assert "Infinity" in (tmp_path / "config.json").read_text()
    again = ModelConfig.from_json(tmp_path)
    assert again == cfg and again.time_step_limit == (0.0, math.inf)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_transformers(name):
    cfg = preset(name)
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "model_type")}
    hf = NemotronHConfig(**d)
    assert hf.layers_block_type == cfg.layers_block_type
    assert hf.mtp_layers_block_type == cfg.mtp_layers_block_type
    again = ModelConfig.from_dict(json.loads(hf.to_json_string()))  # what HF writes, we read back
    assert again.replace(extra={}) == cfg.replace(extra={})
    assert again.time_step_limit == (0.0, math.inf)


def test_preset_numbers():
    ultra = preset("ultra-550b-a55b")
    assert ultra.num_hidden_layers == 108 and ultra.hidden_size == 8192
    assert (ultra.n_routed_experts, ultra.num_experts_per_tok) == (512, 22)
    assert (ultra.num_attention_heads, ultra.num_key_value_heads) == (64, 2)
    assert ultra.max_position_embeddings == 1 << 20
    nano = preset("nano-30b-a3b")
    assert nano.hybrid_override_pattern.count("*") == 6 and nano.mamba_inner_size == 4096
    with pytest.raises(ValueError, match="unknown preset"):
        preset("giant")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"num_key_value_heads": 3}, "num_attention_heads"),
        ({"mamba_num_heads": 6, "n_groups": 4}, "mamba_num_heads"),
        ({"n_routed_experts": 8, "n_group": 3}, "n_routed_experts"),
        ({"n_group": 2, "topk_group": 3}, "topk_group"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"n_group": 8, "topk_group": 1}, "n_group"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"head_dim": -1}, "head_dim"),
        ({"chunk_size": 2.5}, "chunk_size"),
        ({"moe_latent_size": 0}, "moe_latent_size"),
        ({"time_step_limit": [1.0, 0.5]}, "time_step_limit"),
        ({"time_step_min": 0.5, "time_step_max": 0.1}, "time_step_min"),
        ({"mlp_hidden_act": "gelu"}, "mlp_hidden_act"),
        ({"mamba_ssm_cache_dtype": "int8"}, "mamba_ssm_cache_dtype"),
        ({"layers_block_type": ["mamba", "conv"]}, "layers_block_type"),
        ({"hybrid_override_pattern": "MX*", "num_hidden_layers": 3}, "hybrid_override_pattern"),
        ({"num_hidden_layers": 7}, "num_hidden_layers"),
        ({"mtp_layers_block_type": ["mamba", "moe"]}, "mtp_layers_block_type"),
        ({"model_type": "llama"}, "model_type"),
    ],
)
def test_validation_names_the_field(change, field):
    d = hub_style_dict(**change)
    if "layers_block_type" in change:
        del d["hybrid_override_pattern"], d["num_hidden_layers"]
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict(d)


def test_missing_layers_and_bad_json(tmp_path):
    d = hub_style_dict()
    del d["hybrid_override_pattern"]
    with pytest.raises(ValueError, match="layers_block_type or hybrid_override_pattern"):
        ModelConfig.from_dict(d)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_json(tmp_path / "nowhere")


def test_dt_clamp_is_runtime_only():
    cfg = preset("tiny").replace(dt_clamp="transformers")
    assert "dt_clamp" not in cfg.to_dict()
    with pytest.raises(ValueError, match="dt_clamp"):
        preset("tiny").replace(dt_clamp="sometimes")
