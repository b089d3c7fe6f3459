"""Quantization recipes: which tensor gets which format, and what that costs in bits per element.

A recipe is an ordered list of name-pattern rules, first match wins (research/nvfp4.md §4.3); tensors
no rule matches stay BF16. Only 2-D projection weights are quantized: biases, norms, conv1d, the Mamba
per-head tensors and the router always stay in their original precision.

Storage cost per element (research/nvfp4.md §5): NVFP4 = 4-bit E2M1 code + one 8-bit E4M3 scale per 16
elements = 4.5 bits, plus per matrix an fp32 `weight_scale_2` and an fp32 `input_scale`; FP8 per-tensor =
8 bits plus fp32 `weight_scale` and `input_scale`; BF16 = 16 bits.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from nemotron3.config import ModelConfig
from nemotron3.summary import census

GiB = 2**30


@dataclass(frozen=True)
class Format:
    name: str
    bits: float  # storage bits per weight element, block scales included
    scale_bytes_per_matrix: int  # per-tensor scales stored beside each matrix (per expert for routed experts)


BF16 = Format("bf16", 16.0, 0)
FP8 = Format("fp8", 8.0, 8)  # weight_scale + input_scale, fp32 each
NVFP4 = Format("nvfp4", 4.5, 8)  # weight_scale_2 + input_scale, fp32 each
FORMATS = {f.name: f for f in (BF16, FP8, NVFP4)}


@dataclass(frozen=True)
class Rule:
    pattern: str  # fnmatch pattern on the in-memory tensor name
    format: Format
    why: str


@dataclass(frozen=True)
class Recipe:
    name: str
    rules: tuple[Rule, ...]
    description: str

    def format_for(self, name: str, shape: tuple[int, ...]) -> Format:
        """The format of one tensor: the first matching rule for projection weights, else BF16."""
        if not _is_projection(name, shape):
            return BF16
        for rule in self.rules:
            if fnmatch.fnmatchcase(name, rule.pattern):
                return rule.format
        return BF16


def _is_projection(name: str, shape: tuple[int, ...]) -> bool:
    """Linear weights (2-D `*_proj.weight`) and the stacked routed experts ([E, out, in])."""
    if name.endswith(("experts.up_proj", "experts.down_proj")):
        return len(shape) == 3
    return name.endswith("_proj.weight") and len(shape) == 2


# The released Nemotron 3 Ultra NVFP4 checkpoint (research/nvfp4.md §4.1, Ultra tech report Table 12).
ULTRA = Recipe(
    name="ultra",
    description="NVFP4 routed experts; FP8 shared experts and Mamba in/out_proj; everything else BF16",
    rules=(
        Rule("mtp.*", BF16, "MTP block kept BF16 in the released checkpoint"),
        Rule("*.mixer.experts.*", NVFP4, "routed experts: NVFP4 W4A4 (W4A16 on Hopper)"),
        Rule("*.mixer.shared_experts.*", FP8, "shared expert: FP8 per-tensor"),
        Rule("*.mixer.in_proj.weight", FP8, "Mamba in_proj: FP8 per-tensor (only Mamba has in_proj)"),
        Rule("*.mixer.out_proj.weight", FP8, "Mamba out_proj: FP8 per-tensor"),
    ),
)
# ModelOpt's generic presets for Mamba-MoE models (research/nvfp4.md §4.2), for comparison.
AGGRESSIVE = Recipe(
    name="nvfp4-aggressive",
    description="NVFP4 for every projection except attention, latent projections, lm_head and MTP",
    rules=(
        Rule("mtp.*", BF16, "MTP kept BF16"),
        Rule("*.mixer.[qkvo]_proj.weight", BF16, "attention kept BF16"),
        Rule("*latent_proj.weight", BF16, "latent projections kept BF16"),
        Rule("backbone.layers.*", NVFP4, "all other decoder projections NVFP4"),
    ),
)
FP8_ALL = Recipe(
    name="fp8",
    description="FP8 per-tensor for every decoder projection; attention, latent, embeddings, lm_head, MTP BF16",
    rules=(
        Rule("mtp.*", BF16, "MTP kept BF16"),
        Rule("*.mixer.[qkvo]_proj.weight", BF16, "attention kept BF16"),
        Rule("*latent_proj.weight", BF16, "latent projections kept BF16"),
        Rule("backbone.layers.*", FP8, "decoder projections FP8"),
    ),
)
RECIPES = {r.name: r for r in (ULTRA, AGGRESSIVE, FP8_ALL)}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}") from None


# ------------------------------------------------------------------------------------------- report


def module_kind(name: str) -> str:
    """The row of the bits report a tensor belongs to."""
    if name.startswith("mtp."):
        return "MTP block"
    if name.endswith(("experts.up_proj", "experts.down_proj")):
        return "routed experts"
    if ".shared_experts." in name:
        return "shared experts"
    if name.endswith(("mixer.in_proj.weight", "mixer.out_proj.weight")):
        return "Mamba in/out_proj"
    if any(name.endswith(f"mixer.{p}_proj.weight") for p in "qkvo"):
        return "attention"
    if "latent_proj" in name:
        return "latent projections"
    if name in ("backbone.embeddings.weight", "lm_head.weight"):
        return "embeddings + lm_head"
    if name.endswith(("mixer.up_proj.weight", "mixer.down_proj.weight")):
        return "dense MLP"
    return "router, conv, norms, Mamba scalars"


@dataclass
class KindRow:
    kind: str
    params: int
    bits: float  # total storage bits of this kind
    formats: dict[str, int]  # params per format

    @property
    def bits_per_element(self) -> float:
        return self.bits / self.params


@dataclass
class BitsReport:
    recipe: str
    rows: list[KindRow]
    params: int
    bits: float

    @property
    def bits_per_element(self) -> float:
        return self.bits / self.params

    @property
    def bytes(self) -> int:
        return round(self.bits / 8)

    def fit(self, gpus: int = 8, gib_per_gpu: float = 80.0) -> dict[str, float]:
        """Weights spread over `gpus` (tensor parallel): per-GPU weight GiB and what is left for KV/state."""
        per_gpu = self.bytes / gpus / GiB
        return {"gpus": gpus, "gib_per_gpu": gib_per_gpu, "weights_gib_per_gpu": per_gpu,
                "headroom_gib_per_gpu": gib_per_gpu - per_gpu, "fits": per_gpu < gib_per_gpu}  # fmt: skip


def bits_report(config: ModelConfig, recipe: Recipe) -> BitsReport:
    """Storage cost of `config` under `recipe`, per module kind and overall (MTP included, as shipped)."""
    rows: dict[str, KindRow] = {}
    for t in census(config):
        numel = 1
        for d in t.shape:
            numel *= d
        fmt = recipe.format_for(t.name, t.shape)
        matrices = t.shape[0] if len(t.shape) == 3 else 1
        bits = numel * fmt.bits + 8 * fmt.scale_bytes_per_matrix * matrices
        row = rows.setdefault(module_kind(t.name), KindRow(module_kind(t.name), 0, 0.0, {}))
        row.params += numel
        row.bits += bits
        row.formats[fmt.name] = row.formats.get(fmt.name, 0) + numel
    ordered = sorted(rows.values(), key=lambda r: -r.params)
    return BitsReport(recipe.name, ordered, sum(r.params for r in ordered), sum(r.bits for r in ordered))
