"""ModelConfig: the `nemotron_h` config.json, read in all its spellings, validated, and written back.

Field names are exactly Hugging Face's (`transformers` 5.23 `NemotronHConfig`) so a config.json
round-trips. Layer kinds are kept in HF 5.23's canonical spelling:

    pattern char   layers_block_type    legacy name   mixer
    "M"            "linear_attention"   "mamba"       Mamba-2
    "*"            "full_attention"     "attention"   GQA attention
    "E"            "moe"                -             (Latent)MoE
    "-"            "mlp"                -             dense relu² MLP

Sources: research/architecture.md §2 (fields, aliases, released configs) and §12.3 (inferred Ultra).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAMBA, ATTENTION, MOE, MLP = "linear_attention", "full_attention", "moe", "mlp"
LAYER_KINDS = (MAMBA, ATTENTION, MOE, MLP)
PATTERN_CHAR = {MAMBA: "M", ATTENTION: "*", MOE: "E", MLP: "-"}
CHAR_TO_KIND = {c: k for k, c in PATTERN_CHAR.items()}
LEGACY_KIND = {"mamba": MAMBA, "attention": ATTENTION, "hybrid": MAMBA}

# Legacy `mamba_*` keys that HF's NemotronHConfig.__post_init__ renames (architecture.md §2.1).
LEGACY_KEYS = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "num_local_experts": "n_routed_experts",
    "layer_types": "layers_block_type",
}

# How the Mamba step size Δ is clamped (architecture.md §5.8).
DT_CLAMP_CHECKPOINT = "checkpoint"  # clamp to config.time_step_limit in every path (NVIDIA, vLLM, SGLang)
DT_CLAMP_TRANSFORMERS = "transformers"  # HF 5.23: Δ ≥ time_step_min in the chunked path only, none in decode
DT_CLAMP_MODES = (DT_CLAMP_CHECKPOINT, DT_CLAMP_TRANSFORMERS)


def _json_float(value: Any, field_name: str) -> float:
    """A float from config.json: a number, "Infinity"-style string, or HF 5.x's {"__float__": "Infinity"}."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field_name}: expected a number, got {value!r}") from None


def pattern_to_kinds(pattern: str, field_name: str = "hybrid_override_pattern") -> list[str]:
    """Convert an `hybrid_override_pattern` string such as "MEM*E" to a list of layer kinds."""
    bad = sorted({c for c in pattern if c not in CHAR_TO_KIND})
    if bad:
        raise ValueError(f"{field_name}: unknown layer character(s) {bad} in {pattern!r}; expected M, *, E or -")
    return [CHAR_TO_KIND[c] for c in pattern]


def kinds_to_pattern(kinds: list[str]) -> str:
    return "".join(PATTERN_CHAR[k] for k in kinds)


def normalize_kinds(kinds: Any, field_name: str) -> list[str]:
    """Accept a list of kinds in HF 5.23 or legacy spelling (or a pattern string); return canonical kinds."""
    if isinstance(kinds, str):
        return pattern_to_kinds(kinds, field_name)
    if not isinstance(kinds, (list, tuple)):
        raise ValueError(f"{field_name}: expected a list of layer types, got {type(kinds).__name__}")
    out = []
    for i, k in enumerate(kinds):
        k = LEGACY_KIND.get(k, k)
        if k not in LAYER_KINDS:
            raise ValueError(f"{field_name}[{i}]: unknown layer type {k!r}; expected one of {LAYER_KINDS}")
        out.append(k)
    return out


@dataclass
class ModelConfig:
    """Everything that defines a Nemotron-H model's shapes and math (HF `nemotron_h` field names)."""

    vocab_size: int = 131072
    hidden_size: int = 4096
    layers_block_type: list[str] = field(default_factory=lambda: [MAMBA, MOE, ATTENTION, MLP])
    tie_word_embeddings: bool = False  # never applied, as in HF 5.23: lm_head is always its own tensor
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # ignored by HF (projections never have a bias); kept for round trip
    attention_dropout: float = 0.0
    sliding_window: int | None = None
    # dense MLP
    intermediate_size: int = 21504
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False
    # Mamba-2
    ssm_state_size: int = 128
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    mamba_hidden_act: str = "silu"
    n_groups: int = 8
    conv_kernel: int = 4
    expand: int = 2  # unused by the math: the inner width is mamba_num_heads * mamba_head_dim
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    time_step_floor: float = 1e-4
    use_conv_bias: bool = True
    chunk_size: int = 128
    mamba_proj_bias: bool = False  # unused by HF: in_proj/out_proj bias follows use_bias
    use_bias: bool = False
    mamba_ssm_cache_dtype: str = "float32"
    # MoE
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    n_shared_experts: int = 1
    moe_latent_size: int | None = None
    moe_shared_expert_overlap: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    # MTP
    num_nextn_predict_layers: int = 0
    mtp_layers_block_type: list[str] = field(default_factory=lambda: [ATTENTION, MOE])
    # norms, init, misc
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    residual_in_fp32: bool = False
    hidden_dropout: float = 0.0
    use_cache: bool = True
    num_logits_to_keep: int = 1
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    # Keys we do not model but must carry through a round trip (rope_theta, quantization_config, ...).
    extra: dict[str, Any] = field(default_factory=dict)
    # Runtime switch, never written to config.json: which Δ clamp to apply (architecture.md §5.8).
    dt_clamp: str = DT_CLAMP_CHECKPOINT

    def __post_init__(self) -> None:
        self.layers_block_type = normalize_kinds(self.layers_block_type, "layers_block_type")
        self.mtp_layers_block_type = normalize_kinds(self.mtp_layers_block_type, "mtp_layers_block_type")
        self.time_step_limit = tuple(float(v) for v in self.time_step_limit)  # type: ignore[assignment]
        self.validate()

    # ----------------------------------------------------------------- derived sizes
    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers_block_type)

    @property
    def hybrid_override_pattern(self) -> str:
        return kinds_to_pattern(self.layers_block_type)

    @property
    def mtp_hybrid_override_pattern(self) -> str:
        return kinds_to_pattern(self.mtp_layers_block_type)

    @property
    def mamba_inner_size(self) -> int:
        """I = mamba_num_heads * mamba_head_dim (not expand * hidden_size; Nano has 4096 ≠ 2·2688)."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        """C = I + 2·G·N: the channels that go through the causal conv (x | B | C)."""
        return self.mamba_inner_size + 2 * self.n_groups * self.ssm_state_size

    @property
    def moe_expert_input_size(self) -> int:
        """Width the routed experts act on: the latent size L, or H without latent projections."""
        return self.moe_latent_size or self.hidden_size

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        positive = [
            "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "ssm_state_size", "mamba_num_heads", "mamba_head_dim", "n_groups",
            "conv_kernel", "chunk_size", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
            "moe_shared_expert_intermediate_size", "n_group", "topk_group",
        ]  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.layers_block_type:
            raise ValueError("layers_block_type must name at least one layer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.mamba_num_heads % self.n_groups:
            raise ValueError(f"mamba_num_heads ({self.mamba_num_heads}) must be a multiple of n_groups ({self.n_groups})")
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts ({self.n_routed_experts}) must be a multiple of n_group ({self.n_group})")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            raise ValueError(
                f"n_group ({self.n_group}): each group needs >= 2 experts (group score = sum of its top 2), "
                f"got n_routed_experts={self.n_routed_experts}"
            )
        selectable = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > selectable:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the {selectable} experts reachable "
                f"in topk_group={self.topk_group} of n_group={self.n_group} groups"
            )
        if self.moe_latent_size is not None and (not isinstance(self.moe_latent_size, int) or self.moe_latent_size <= 0):
            raise ValueError(f"moe_latent_size must be a positive integer or null, got {self.moe_latent_size!r}")
        if self.mlp_hidden_act != "relu2":
            raise ValueError(f"mlp_hidden_act: only 'relu2' exists in nemotron_h, got {self.mlp_hidden_act!r}")
        if self.mamba_hidden_act != "silu":
            raise ValueError(f"mamba_hidden_act: only 'silu' exists in nemotron_h, got {self.mamba_hidden_act!r}")
        lo, hi = self.time_step_limit
        if len(self.time_step_limit) != 2 or lo < 0 or lo > hi:
            raise ValueError(f"time_step_limit must be (low, high) with 0 <= low <= high, got {self.time_step_limit}")
        if not 0 < self.time_step_min <= self.time_step_max:
            raise ValueError(
                f"time_step_min ({self.time_step_min}) and time_step_max ({self.time_step_max}) "
                "must satisfy 0 < min <= max"
            )
        if self.num_nextn_predict_layers < 0:
            raise ValueError(f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}")
        if self.num_nextn_predict_layers and not self.mtp_layers_block_type:
            raise ValueError("mtp_layers_block_type must name at least one layer when num_nextn_predict_layers > 0")
        if MAMBA in self.mtp_layers_block_type:
            raise ValueError("mtp_layers_block_type: Mamba layers inside the MTP block are not supported")
        if self.mamba_ssm_cache_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"mamba_ssm_cache_dtype must be float32, bfloat16 or float16, got {self.mamba_ssm_cache_dtype!r}")
        if self.dt_clamp not in DT_CLAMP_MODES:
            raise ValueError(f"dt_clamp must be one of {DT_CLAMP_MODES}, got {self.dt_clamp!r}")

    # ----------------------------------------------------------------- reading and writing
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from a config.json dict in any spelling: pattern strings, legacy kinds and `mamba_*` keys."""
        d = dict(raw)
        model_type = d.pop("model_type", "nemotron_h")
        if model_type not in ("nemotron_h", "nemotron_h_mtp"):
            raise ValueError(f"model_type: expected 'nemotron_h', got {model_type!r}")
        for old, new in LEGACY_KEYS.items():
            if old in d:
                value = d.pop(old)
                d.setdefault(new, value)
        pattern = d.pop("hybrid_override_pattern", None)
        num_layers = d.pop("num_hidden_layers", None)
        if d.get("layers_block_type") is None:
            if pattern is None:
                raise ValueError("config.json names no layers: give layers_block_type or hybrid_override_pattern")
            d["layers_block_type"] = pattern_to_kinds(pattern)
        kinds = normalize_kinds(d["layers_block_type"], "layers_block_type")
        if num_layers is not None and num_layers != len(kinds):
            raise ValueError(
                f"num_hidden_layers ({num_layers}) does not match the {len(kinds)} layers of layers_block_type"
            )
        mtp_pattern = d.pop("mtp_hybrid_override_pattern", None)
        if d.get("mtp_layers_block_type") is None:
            d["mtp_layers_block_type"] = pattern_to_kinds(mtp_pattern, "mtp_hybrid_override_pattern") if mtp_pattern else [ATTENTION, MOE]
        if d.get("time_step_limit") is not None:
            d["time_step_limit"] = tuple(_json_float(v, "time_step_limit") for v in d["time_step_limit"])
        elif "time_step_limit" in d:
            d.pop("time_step_limit")
        d.pop("dt_clamp", None)
        if d.get("architectures") == ["NemotronHForCausalLM"]:
            d.pop("architectures")  # to_dict writes it back
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "dt_clamp"}
        extra = {k: v for k, v in d.items() if k not in known}
        kwargs = {k: v for k, v in d.items() if k in known}
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict: HF 5.23 list spellings plus the legacy pattern strings older readers need."""
        out: dict[str, Any] = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h"}
        out.update({k: v for k, v in self.extra.items() if k not in ("architectures", "model_type")})
        for f in dataclasses.fields(self):
            if f.name in ("extra", "dt_clamp"):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        # Older readers (transformers 4.5x, some vLLM versions) read these; HF 5.23 accepts them when equal.
        out["num_hidden_layers"] = self.num_hidden_layers
        out["hybrid_override_pattern"] = self.hybrid_override_pattern
        out["mtp_hybrid_override_pattern"] = self.mtp_hybrid_override_pattern
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw)

    def to_json(self, path: str | Path) -> None:
        """Write config.json (inf is written as the JSON-extension literal Infinity, as HF does)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------- presets


def _tiny() -> ModelConfig:
    """A test model with every layer kind, LatentMoE and one MTP block (research/architecture.md §9.2)."""
    return ModelConfig(
        vocab_size=256, hidden_size=64, layers_block_type=pattern_to_kinds("MEM*E-"),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        intermediate_size=96, ssm_state_size=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=2,
        conv_kernel=4, chunk_size=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48, moe_latent_size=32, routed_scaling_factor=2.5,
        num_nextn_predict_layers=1, mtp_layers_block_type=[ATTENTION, MOE],
    )  # fmt: skip


def _nano() -> ModelConfig:
    """NVIDIA-Nemotron-3-Nano-30B-A3B (config.json as released; research/architecture.md §2.3)."""
    return ModelConfig(
        vocab_size=131072, hidden_size=2688,
        layers_block_type=pattern_to_kinds("MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"),
        num_attention_heads=32, num_key_value_heads=2, head_dim=128, max_position_embeddings=262144,
        intermediate_size=1856, ssm_state_size=128, mamba_num_heads=64, mamba_head_dim=64, n_groups=8,
        conv_kernel=4, chunk_size=128, n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856,
        moe_shared_expert_intermediate_size=3712, moe_latent_size=None, routed_scaling_factor=2.5,
        n_group=1, topk_group=1, num_nextn_predict_layers=0,
    )  # fmt: skip


def _super() -> ModelConfig:
    """NVIDIA-Nemotron-3-Super-120B-A12B (config.json as released; research/architecture.md §2.3)."""
    return ModelConfig(
        vocab_size=131072, hidden_size=4096,
        layers_block_type=pattern_to_kinds(
            "MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME"
        ),
        num_attention_heads=32, num_key_value_heads=2, head_dim=128, max_position_embeddings=262144,
        intermediate_size=2688, ssm_state_size=128, mamba_num_heads=128, mamba_head_dim=64, n_groups=8,
        conv_kernel=4, chunk_size=128, n_routed_experts=512, num_experts_per_tok=22, moe_intermediate_size=2688,
        moe_shared_expert_intermediate_size=5376, moe_latent_size=1024, routed_scaling_factor=5.0,
        moe_shared_expert_overlap=False, n_group=1, topk_group=1,
        num_nextn_predict_layers=1, mtp_layers_block_type=[ATTENTION, MOE],
    )  # fmt: skip


def _ultra() -> ModelConfig:
    """Nemotron-3-Ultra-550B-A55B. No config.json is public; values marked INFERRED are not verified.

    Published: 108 layers, hidden 8192, 512 experts top-22, 64 query / 2 KV heads, 1M context, MTP.
    INFERRED (research/architecture.md §12.3): head_dim 128, Mamba 256 heads × 64, G 8, N 128,
    F 5120, S 10240 and L 2048 (third-party fixtures); the 48 M / 48 E / 12 * split, which is the only
    split that reproduces 550B total / 55B active; its order (12 repeats of Super's unit "MEMEMEM*E");
    routed_scaling_factor 5.0 and n_group/topk_group 1 (as Super); MTP block "*E" (as Super).
    """
    return ModelConfig(
        vocab_size=131072, hidden_size=8192,
        layers_block_type=pattern_to_kinds("MEMEMEM*E" * 12),  # INFERRED order and split
        num_attention_heads=64, num_key_value_heads=2, head_dim=128,  # head_dim INFERRED
        max_position_embeddings=1048576,
        intermediate_size=5120,  # INFERRED (unused: no dense MLP layers)
        ssm_state_size=128, mamba_num_heads=256, mamba_head_dim=64, n_groups=8,  # INFERRED
        conv_kernel=4, chunk_size=128,
        n_routed_experts=512, num_experts_per_tok=22,
        moe_intermediate_size=5120, moe_shared_expert_intermediate_size=10240, moe_latent_size=2048,  # INFERRED
        routed_scaling_factor=5.0, moe_shared_expert_overlap=False, n_group=1, topk_group=1,  # INFERRED
        num_nextn_predict_layers=1, mtp_layers_block_type=[ATTENTION, MOE],  # INFERRED pattern
    )  # fmt: skip


PRESETS = {
    "tiny": _tiny,
    "nano-30b-a3b": _nano,
    "super-120b-a12b": _super,
    "ultra-550b-a55b": _ultra,
}


def preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for a preset name (tiny, nano-30b-a3b, super-120b-a12b, ultra-550b-a55b)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
