"""A nemotron3 NemotronH LatentMoE model written as a llama.cpp GGUF (architecture `nemotron_h_moe`, float32).

bench_llamacpp.py uses it so that llama.cpp runs exactly the tensors our engine runs. The metadata keys and
the tensor transforms are those llama.cpp's nemotron-h loader reads (research/perf.md §4.1):
A = −exp(A_log) and D as [heads, 1]; the conv weight [C, 1, K] as [C, K]; the gated norm's weight [d_inner]
as [groups, d_inner / groups]; the stacked experts [E, I, L] and [E, L, I] as they are. Layer kinds are
per-layer arrays: a Mamba layer has feed_forward_length 0 and head_count_kv 0, an attention layer
head_count_kv > 0, a MoE layer feed_forward_length > 0. llama.cpp's Mamba-2 graph (0.3.36) clamps no Δt, which
matches the default time_step_limit (0, inf); a model with a finite limit would differ there. Needs PyPI `gguf`
(the `bench` extra).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

ARCH = "nemotron_h_moe"
# The GGUF tensors that matrices="bf16" stores as bfloat16: the ones our weight_dtype="bfloat16" narrows
# (engine/runner.py narrow_weight_storage: every Linear, the routers, the routed experts, lm_head).
MATRICES = (
    "ssm_in.weight", "ssm_out.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
    "ffn_gate_inp.weight", "ffn_latent_down.weight", "ffn_latent_up.weight", "ffn_up_exps.weight",
    "ffn_down_exps.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight", "output.weight",
)  # fmt: skip


def _check(config) -> None:
    """Only what `nemotron_h_moe` can express: Mamba, attention and MoE layers."""
    pattern = config.hybrid_override_pattern
    if set(pattern) - set("M*E"):
        raise ValueError(
            f"hybrid_override_pattern {pattern!r}: nemotron_h_moe GGUFs hold Mamba (M), attention (*) and "
            "MoE (E) layers only, not dense MLP (-) layers"
        )
    if "E" not in pattern:
        raise ValueError(f"hybrid_override_pattern {pattern!r}: a nemotron_h_moe GGUF needs at least one MoE layer")
    biased = [name for name in ("attention_bias", "mamba_proj_bias", "use_bias") if getattr(config, name, False)]
    if biased:
        raise ValueError(f"{', '.join(biased)}: this export writes no projection biases (released models have none)")


def gguf_tensors(model) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in torch's dimension order) for every tensor llama.cpp reads. The MTP
    layers are left out (llama.cpp's converter with --no-mtp)."""
    config = model.config
    _check(config)
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}

    def get(name: str) -> np.ndarray:
        return sd[name].numpy()

    yield "token_embd.weight", get("backbone.embeddings.weight")
    for i, kind in enumerate(config.hybrid_override_pattern):
        p, b = f"backbone.layers.{i}.", f"blk.{i}."
        yield b + "attn_norm.weight", get(p + "norm.weight")
        m = p + "mixer."
        if kind == "M":
            heads, groups = config.mamba_num_heads, config.n_groups
            yield b + "ssm_in.weight", get(m + "in_proj.weight")
            yield b + "ssm_conv1d.weight", get(m + "conv1d.weight")[:, 0, :]
            if m + "conv1d.bias" in sd:
                yield b + "ssm_conv1d.bias", get(m + "conv1d.bias")
            yield b + "ssm_dt.bias", get(m + "dt_bias")
            yield b + "ssm_a", -np.exp(get(m + "A_log")).reshape(heads, 1)
            yield b + "ssm_d", get(m + "D").reshape(heads, 1)
            yield b + "ssm_norm.weight", get(m + "norm.weight").reshape(groups, -1)
            yield b + "ssm_out.weight", get(m + "out_proj.weight")
        elif kind == "*":
            for ours, theirs in (
                ("q_proj", "attn_q"),
                ("k_proj", "attn_k"),
                ("v_proj", "attn_v"),
                ("o_proj", "attn_output"),
            ):
                yield f"{b}{theirs}.weight", get(f"{m}{ours}.weight")
        else:
            yield b + "ffn_gate_inp.weight", get(m + "gate.weight")
            yield b + "exp_probs_b.bias", get(m + "gate.e_score_correction_bias")
            if config.moe_latent_size:
                yield b + "ffn_latent_down.weight", get(m + "fc1_latent_proj.weight")
                yield b + "ffn_latent_up.weight", get(m + "fc2_latent_proj.weight")
            yield b + "ffn_up_exps.weight", get(m + "experts.up_proj")
            yield b + "ffn_down_exps.weight", get(m + "experts.down_proj")
            yield b + "ffn_up_shexp.weight", get(m + "shared_experts.up_proj.weight")
            yield b + "ffn_down_shexp.weight", get(m + "shared_experts.down_proj.weight")
    yield "output_norm.weight", get("backbone.norm_f.weight")
    if not config.tie_word_embeddings:  # llama.cpp falls back to token_embd when `output` is absent
        yield "output.weight", get("lm_head.weight")


def write_metadata(writer, config, bf16: bool = False) -> None:
    """The `nemotron_h_moe` keys llama.cpp reads, for a tokenizer-less model (token ids only: `no_vocab`)."""
    import gguf

    pattern = config.hybrid_override_pattern
    w = writer
    w.add_block_count(len(pattern))
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length([config.moe_intermediate_size if k == "E" else 0 for k in pattern])
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv([config.num_key_value_heads if k == "*" else 0 for k in pattern])
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)  # read, unused: NemotronH has no RoPE
    w.add_rope_scaling_finetuned(False)
    w.add_layer_norm_eps(config.layer_norm_epsilon)
    w.add_expert_count(config.n_routed_experts)
    w.add_expert_used_count(config.num_experts_per_tok)
    w.add_expert_group_count(config.n_group)
    w.add_expert_group_used_count(config.topk_group)
    w.add_expert_feed_forward_length(config.moe_intermediate_size)
    w.add_expert_shared_feed_forward_length(config.moe_shared_expert_intermediate_size)
    w.add_expert_shared_count(config.n_shared_experts)
    w.add_expert_weights_norm(bool(config.norm_topk_prob))
    w.add_expert_weights_scale(float(config.routed_scaling_factor))
    if config.moe_latent_size:
        w.add_moe_latent_size(config.moe_latent_size)
    w.add_ssm_conv_kernel(config.conv_kernel)
    w.add_ssm_state_size(config.ssm_state_size)
    w.add_ssm_group_count(config.n_groups)
    w.add_ssm_inner_size(config.mamba_num_heads * config.mamba_head_dim)
    w.add_ssm_time_step_rank(config.mamba_num_heads)
    w.add_vocab_size(config.vocab_size)
    w.add_tokenizer_model("no_vocab")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if bf16 else gguf.LlamaFileType.ALL_F32)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def export_gguf(model, path: str | Path, matrices: str = "f32") -> Path:
    """Write `model` (a nemotron3 NemotronHForCausalLM) to `path` as a GGUF; returns the path. matrices="bf16"
    stores the MATRICES tensors as bfloat16 (rounded to nearest even, as torch's .to(bfloat16)), the rest float32."""
    import gguf

    if matrices not in ("f32", "bf16"):
        raise ValueError(f"matrices must be 'f32' or 'bf16', got {matrices!r}")
    path = Path(path)
    _check(model.config)
    bf16 = matrices == "bf16"
    writer = gguf.GGUFWriter(str(path), ARCH)
    write_metadata(writer, model.config, bf16)
    for name, array in gguf_tensors(model):
        array = np.ascontiguousarray(array, dtype=np.float32)
        if bf16 and name.endswith(MATRICES):
            rounded = torch.from_numpy(array).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            # the bytes as uint8 [..., 2·last]: gguf derives the element shape from the byte shape
            writer.add_tensor(name, rounded.view(np.uint8), raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
