"""Model summary: layer pattern, parameter counts (total / active / MTP), weight and cache memory.

Everything is computed from the model itself, built on the meta device (shapes only, nothing is
allocated, so Ultra's 560B tensors cost nothing), by classifying each tensor by its hub name
(research/architecture.md §9.2). The closed-form formulas of architecture.md §12.1 are kept in
tests/test_summary.py as an independent cross-check.

Conventions (those of the published numbers, architecture.md §12.2):
* `total_params` excludes the MTP block; it counts every parameter and the router's
  `e_score_correction_bias` buffer (as HF's state-dict sum does). Embeddings and lm_head are untied.
* "active" parameters per token count the routed experts at k/E of their weights and everything
  else fully (lm_head included); `active_params_excl_embedding` also drops the input embedding table.
* Weight memory is an estimate under simple, stated assumptions (see `FORMAT_ASSUMPTIONS`): one
  format for every linear-projection weight. Per-module recipes (the released Ultra/Super mixes) are
  the quantization package's business, not this summary's.
* KV cache is bf16 K and V per attention layer per token; Mamba state per sequence is the SSM state
  in `mamba_ssm_cache_dtype` plus the conv window (K−1 columns of x|B|C) in bf16, whatever the length.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch

from nemotron3.config import ATTENTION, MAMBA, MLP, MOE, ModelConfig
from nemotron3.model.nemotron import NemotronHForCausalLM, keeps_fp32

# Friendly names for the layer kinds, in the order tables show them.
KIND_NAMES = {MAMBA: "mamba", ATTENTION: "attention", MOE: "moe", MLP: "mlp"}

# Sequence lengths the cache table reports: 8k, 128k and 1M tokens.
DEFAULT_CONTEXTS = (8 * 1024, 128 * 1024, 1024 * 1024)

KV_BYTES = 2  # bf16 K and V
CONV_STATE_BYTES = 2  # the conv window holds pre-conv activations in the model dtype (bf16)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

FORMATS = ("bf16", "fp8", "nvfp4")
_LINEAR_SET = (
    "every linear-projection weight of the decoder and MTP layers (Mamba in/out_proj, q/k/v/o_proj, MLPs, "
    "shared and routed experts, latent projections, eh_proj)"
)
_REST = "embeddings, lm_head, router, conv1d, norms and biases in bf16"
FORMAT_ASSUMPTIONS = {
    "bf16": "2 bytes/element; router bias and Mamba A_log/D/dt_bias in fp32, as nemotron3 holds a bf16 model",
    "fp8": f"{_LINEAR_SET} at 1 byte/element + one fp32 scale per matrix (per expert); {_REST}. "
    "A uniform estimate, not a released recipe",
    "nvfp4": f"{_LINEAR_SET} at 4.5 bits/element (E2M1 codes + one E4M3 scale per 16) + one fp32 scale per "
    f"matrix (per expert); {_REST}. A lower bound: the released Ultra recipe keeps attention, latent "
    "projections and MTP in BF16 and Mamba/shared experts in FP8 (~5.03 bits/param, research/nvfp4.md §5)",
}

_LAYER = re.compile(r"^backbone\.layers\.(\d+)\.")
_ROUTED = re.compile(r"\.mixer\.experts\.(up|down)_proj$")
_LINEAR = re.compile(r"^(backbone|mtp)\.layers\.\d+\..*_proj(\.weight)?$")


@dataclass(frozen=True)
class TensorInfo:
    """One parameter or buffer of the model, classified by name."""

    name: str
    shape: tuple[int, ...]
    part: str  # "embeddings", "lm_head", "norm_f", a layer kind name, "moe_routed_experts" or "mtp"
    mtp: bool  # lives in the MTP block (not in the published total)
    routed: bool  # a stacked routed-expert tensor [E, ·, ·]: active at k/E
    linear: bool  # a linear-projection weight (quantizable in the memory estimates)
    fp32: bool  # kept in float32 in a bf16 model

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def matrices(self) -> int:
        """Number of separately scaled matrices: E for stacked experts, else 1."""
        return self.shape[0] if self.routed else 1

    def nbytes(self, fmt: str) -> int:
        """Bytes this tensor takes in weight format `fmt` (one of FORMATS; see FORMAT_ASSUMPTIONS)."""
        if fmt not in FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}; expected one of {FORMATS}")
        if self.linear and fmt == "fp8":
            return self.numel + 4 * self.matrices
        if self.linear and fmt == "nvfp4":
            return -(-self.numel * 9 // 16) + 4 * self.matrices  # 4.5 bits = 9/16 byte, rounded up
        return self.numel * (4 if self.fp32 else 2)


@dataclass(frozen=True)
class WeightMemory:
    format: str
    bytes: int  # the main model (what total_params counts)
    bytes_with_mtp: int  # plus the MTP block (a full checkpoint)
    assumption: str


@dataclass(frozen=True)
class ContextMemory:
    """Cache memory of one sequence of `tokens` tokens."""

    tokens: int
    kv_bytes: int  # main model's attention layers
    mtp_kv_bytes: int  # MTP attention layers (only when drafting with MTP)
    mamba_state_bytes: int  # SSM + conv state, independent of length
    total_bytes: int  # kv + mtp_kv + mamba state


@dataclass(frozen=True)
class ModelSummary:
    pattern: str  # hybrid_override_pattern, e.g. "MEMEM*E..."
    layer_counts: dict[str, int]  # mamba / attention / moe / mlp
    mtp_pattern: str  # "" without MTP
    mtp_blocks: int  # num_nextn_predict_layers
    total_params: int  # excl. MTP, as published
    active_params: int  # per token, incl. the input embedding table
    active_params_excl_embedding: int
    embedding_params: int
    mtp_params: int
    mtp_active_params: int
    params_by_part: dict[str, int]  # main model only; sums to total_params
    weight_memory: list[WeightMemory]
    kv_bytes_per_token: int
    mtp_kv_bytes_per_token: int
    ssm_state_bytes: int  # per sequence
    conv_state_bytes: int  # per sequence
    contexts: list[ContextMemory]

    @property
    def mamba_state_bytes(self) -> int:
        return self.ssm_state_bytes + self.conv_state_bytes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------- census


def classify(name: str, shape: tuple[int, ...], config: ModelConfig) -> TensorInfo:
    """Classify one tensor by its hub name; raise ValueError for a name outside the contract."""
    mtp = name.startswith("mtp.layers.")
    routed = bool(_ROUTED.search(name))
    linear = bool(_LINEAR.match(name)) and len(shape) >= 2
    fp32 = keeps_fp32(name)
    if mtp:
        part = "mtp"
    elif name == "backbone.embeddings.weight":
        part = "embeddings"
    elif name == "lm_head.weight":
        part = "lm_head"
    elif name == "backbone.norm_f.weight":
        part = "norm_f"
    elif m := _LAYER.match(name):
        index = int(m.group(1))
        if index >= config.num_hidden_layers:
            raise ValueError(f"{name}: layer {index} beyond the config's {config.num_hidden_layers} layers")
        part = "moe_routed_experts" if routed else KIND_NAMES[config.layers_block_type[index]]
    else:
        raise ValueError(f"unexpected tensor name {name!r}: not a nemotron_h hub name")
    return TensorInfo(name=name, shape=tuple(shape), part=part, mtp=mtp, routed=routed, linear=linear, fp32=fp32)


def census(config: ModelConfig) -> list[TensorInfo]:
    """All parameters and buffers of NemotronHForCausalLM(config), built on the meta device (no memory)."""
    with torch.device("meta"):
        model = NemotronHForCausalLM(config)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [classify(name, tuple(t.shape), config) for name, t in tensors]


# --------------------------------------------------------------------------------------------- counts


def active_numel(t: TensorInfo, config: ModelConfig) -> int:
    """Elements used per token: k of the E stacked experts for routed tensors, all others fully."""
    if t.routed:
        return t.numel // config.n_routed_experts * config.num_experts_per_tok
    return t.numel


def kv_bytes_per_token(config: ModelConfig) -> tuple[int, int]:
    """(main, MTP) bf16 KV bytes per token: attention layers · 2 (K,V) · nkv · head_dim · 2 bytes."""
    per_layer = 2 * config.num_key_value_heads * config.head_dim * KV_BYTES
    main = config.layers_block_type.count(ATTENTION) * per_layer
    mtp = config.num_nextn_predict_layers * config.mtp_layers_block_type.count(ATTENTION) * per_layer
    return main, mtp


def mamba_state_bytes(config: ModelConfig) -> tuple[int, int]:
    """(SSM, conv) bytes per sequence, summed over Mamba layers.

    SSM state nh·P·N in mamba_ssm_cache_dtype (float32 in the releases); conv window C·(K−1) in bf16.
    """
    n = config.layers_block_type.count(MAMBA)
    ssm_dtype_bytes = DTYPE_BYTES[config.mamba_ssm_cache_dtype]
    ssm = config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size * ssm_dtype_bytes
    conv = config.mamba_conv_dim * (config.conv_kernel - 1) * CONV_STATE_BYTES
    return n * ssm, n * conv


def _parts(tensors: list[TensorInfo]) -> dict[str, int]:
    order = ["embeddings", *KIND_NAMES.values(), "moe_routed_experts", "norm_f", "lm_head"]
    counts = dict.fromkeys(order, 0)
    for t in tensors:
        counts[t.part] += t.numel
    return counts


def summarize(config: ModelConfig, contexts: tuple[int, ...] = DEFAULT_CONTEXTS) -> ModelSummary:
    """Summary of the model `config` describes (see the module docstring for the conventions)."""
    tensors = census(config)
    main = [t for t in tensors if not t.mtp]
    mtp = [t for t in tensors if t.mtp]
    total = sum(t.numel for t in main)
    active = sum(active_numel(t, config) for t in main)
    embedding = sum(t.numel for t in main if t.part == "embeddings")
    weights = [
        WeightMemory(
            format=fmt,
            bytes=sum(t.nbytes(fmt) for t in main),
            bytes_with_mtp=sum(t.nbytes(fmt) for t in tensors),
            assumption=FORMAT_ASSUMPTIONS[fmt],
        )
        for fmt in FORMATS
    ]
    kv, mtp_kv = kv_bytes_per_token(config)
    ssm, conv = mamba_state_bytes(config)
    rows = [
        ContextMemory(tokens=n, kv_bytes=n * kv, mtp_kv_bytes=n * mtp_kv, mamba_state_bytes=ssm + conv,
                      total_bytes=n * (kv + mtp_kv) + ssm + conv)
        for n in contexts
    ]  # fmt: skip
    return ModelSummary(
        pattern=config.hybrid_override_pattern,
        layer_counts={name: config.layers_block_type.count(kind) for kind, name in KIND_NAMES.items()},
        mtp_pattern=config.mtp_hybrid_override_pattern if config.num_nextn_predict_layers else "",
        mtp_blocks=config.num_nextn_predict_layers,
        total_params=total,
        active_params=active,
        active_params_excl_embedding=active - embedding,
        embedding_params=embedding,
        mtp_params=sum(t.numel for t in mtp),
        mtp_active_params=sum(active_numel(t, config) for t in mtp),
        params_by_part=_parts(main),
        weight_memory=weights,
        kv_bytes_per_token=kv,
        mtp_kv_bytes_per_token=mtp_kv,
        ssm_state_bytes=ssm,
        conv_state_bytes=conv,
        contexts=rows,
    )
