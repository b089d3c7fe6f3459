"""Post-training quantization: calibrate a loaded model, quantize it with a recipe, write ModelOpt's layout.

Steps (research/nvfp4.md §2.3, §3):

1. Plan: the recipe (`nemotron3.quant.recipe`) gives each projection a format: NVFP4, FP8 or BF16.
2. Calibrate: run N token windows through the model with forward hooks that record the activation amax
   (max |x|) at the input of every quantized Linear, at the input of every routed expert's up_proj
   (the tokens routed to it) and down_proj (relu² of its up_proj output), and at the outputs of the
   attention k_proj / v_proj (the FP8 KV-cache scales). Experts that no calibration token reached get
   the max over the other experts of their layer, as ModelOpt does (`set_expert_quantizer_amax`).
3. Quantize the weights by max scaling, bit-compatible with ModelOpt (`nvfp4_quantize`, `fp8_quantize`),
   each routed expert on its own (its own `weight_scale_2` and `input_scale`):

       NVFP4  weight uint8 [out, in/2], weight_scale float8_e4m3fn [out, in/16], weight_scale_2 fp32 [],
              input_scale fp32 [] = amax / (6·448)
       FP8    weight float8_e4m3fn [out, in], weight_scale fp32 [] = amax_W / 448, input_scale = amax / 448
       KV     k_proj.k_scale, v_proj.v_scale fp32 [] = amax / 448   (kv_cache_quant_algo "FP8")
       other  BF16, except the FP32_TENSORS (A_log, D, dt_bias, e_score_correction_bias) kept float32

4. Write safetensors (routed experts one tensor per expert, the on-disk names), config.json with a
   `quantization_config`, `hf_quant_config.json` (single format + exclude_modules, or MIXED_PRECISION
   + quantized_layers when the recipe uses more than one format), and the tokenizer files.

Entry points: `quantize_checkpoint(src, dst, recipe)` (what `nemotron3 quantize` runs), or the pieces
`plan_model`, `calibration_batches`, `calibrate`, `quantize_state`, `save_quantized`.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.config import ModelConfig
from nemotron3.io.checkpoint import STACKED, save_checkpoint
from nemotron3.model.attention import Attention
from nemotron3.model.mlp import relu2
from nemotron3.model.moe import Experts
from nemotron3.model.nemotron import NemotronHForCausalLM, keeps_fp32
from nemotron3.quant.fp8 import fp8_input_scale, fp8_quantize
from nemotron3.quant.load import FORMAT_ALGO, HF_QUANT_CONFIG, QuantConfig, copy_tokenizer_files
from nemotron3.quant.nvfp4 import NVFP4_BLOCK, nvfp4_input_scale, nvfp4_quantize
from nemotron3.quant.recipe import Recipe, get_recipe

UNROUTED_FALLBACK_AMAX = 0.5  # ModelOpt's input amax for a layer whose experts all went uncalibrated
KV_CACHE_ALGOS = ("FP8", None)


# ------------------------------------------------------------------------------------------ plan


@dataclass
class QuantPlan:
    """Format per module (in-memory names): Linear modules and stacked routed experts ("nvfp4" / "fp8")."""

    linears: dict[str, str] = field(default_factory=dict)
    experts: dict[str, dict[str, str]] = field(default_factory=dict)  # {"…mixer.experts": {"up_proj": fmt, …}}
    unquantized: list[str] = field(default_factory=list)  # Linear modules (and experts) kept BF16

    @property
    def formats(self) -> set[str]:
        return set(self.linears.values()) | {f for d in self.experts.values() for f in d.values()}


def plan_model(model: NemotronHForCausalLM, recipe: Recipe) -> QuantPlan:
    """Apply the recipe's rules to every projection weight of the model."""
    plan = QuantPlan()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            fmt = recipe.format_for(f"{name}.weight", tuple(module.weight.shape)).name
            if fmt == "bf16":
                plan.unquantized.append(name)
                continue
            if module.in_features % NVFP4_BLOCK and fmt == "nvfp4":
                raise ValueError(f"{name}: in_features {module.in_features} is not a multiple of 16 (NVFP4)")
            plan.linears[name] = fmt
        elif isinstance(module, Experts):
            fmts = {p: recipe.format_for(f"{name}.{p}", tuple(getattr(module, p).shape)).name
                    for p in ("up_proj", "down_proj")}  # fmt: skip
            if set(fmts.values()) == {"bf16"}:
                plan.unquantized.append(name)
            elif "bf16" in fmts.values():
                raise ValueError(f"{name}: quantizing only one of up_proj/down_proj is not supported ({fmts})")
            else:
                plan.experts[name] = fmts
    return plan


# ------------------------------------------------------------------------------------------ calibration


def calibration_batches(n: int, seq_len: int, vocab_size: int, *, text: str | None = None,
                        tokenizer=None, seed: int = 0) -> list[torch.Tensor]:  # fmt: skip
    """`n` token windows [1, seq_len]: from `text` (tokenized, or its UTF-8 bytes when there is no
    tokenizer) spread evenly over it, or seeded random tokens when there is no text."""
    if n < 1 or seq_len < 1:
        raise ValueError(f"need n >= 1 and seq_len >= 1, got {n}, {seq_len}")
    if text is None:
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, vocab_size, (1, seq_len), generator=g) for _ in range(n)]
    ids = tokenizer.encode(text) if tokenizer is not None else list(text.encode("utf-8"))
    ids = torch.tensor(ids, dtype=torch.long) % vocab_size
    if ids.numel() == 0:
        raise ValueError("the calibration text is empty")
    if ids.numel() < seq_len:
        ids = ids.repeat(seq_len // ids.numel() + 1)
    last = ids.numel() - seq_len
    starts = [round(i * last / max(n - 1, 1)) for i in range(n)]
    return [ids[s : s + seq_len][None] for s in starts]


@dataclass
class Calibration:
    """Activation amax per module (in-memory names) from calibration."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # Linear name → fp32 scalar
    experts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name → {proj: amax [E]}
    routed: dict[str, torch.Tensor] = field(default_factory=dict)  # name → tokens per expert [E]
    kv: dict[str, torch.Tensor] = field(default_factory=dict)  # "…k_proj" / "…v_proj" → output amax
    tokens: int = 0

    def expert_amax(self, name: str, proj: str) -> torch.Tensor:
        """Per-expert input amax with unrouted experts filled by the layer's max (ModelOpt's rule)."""
        amax, seen = self.experts[name][proj], self.routed[name] > 0
        fill = amax[seen].max() if seen.any() else torch.tensor(UNROUTED_FALLBACK_AMAX)
        return torch.where(seen, amax, fill)


def _amax(t: torch.Tensor) -> torch.Tensor:
    return t.detach().abs().amax().float() if t.numel() else torch.zeros(())


def calibrate(model: NemotronHForCausalLM, plan: QuantPlan, batches: list[torch.Tensor], *,
              kv_cache: bool = True, progress: bool = True) -> Calibration:  # fmt: skip
    """Run `batches` through the model and collect the amax statistics the plan needs."""
    cal = Calibration()
    hooks = []

    def linear_hook(name):
        def hook(module, args):
            a = _amax(args[0])
            cal.inputs[name] = torch.maximum(cal.inputs.get(name, a), a)

        return hook

    def experts_hook(name):
        def hook(module, args):
            x, _, indices = args
            E, k = module.up_proj.shape[0], indices.shape[1]
            flat = indices.reshape(-1)
            stats = cal.experts.setdefault(name, {"up_proj": torch.zeros(E), "down_proj": torch.zeros(E)})
            cal.routed[name] = (
                cal.routed.get(name, torch.zeros(E, dtype=torch.long)) + torch.bincount(flat, minlength=E).cpu()
            )
            token_amax = x.detach().abs().amax(-1).float().repeat_interleave(k).cpu()
            stats["up_proj"] = stats["up_proj"].scatter_reduce(0, flat.cpu(), token_amax, "amax")
            for e in flat.unique().tolist():
                rows = x[(indices == e).any(-1)]
                h = relu2(F.linear(rows, module.up_proj[e]))
                stats["down_proj"][e] = torch.maximum(stats["down_proj"][e], _amax(h).cpu())

        return hook

    def kv_hook(name):
        def hook(module, args, out):
            a = _amax(out)
            cal.kv[name] = torch.maximum(cal.kv.get(name, a), a)

        return hook

    for name, module in model.named_modules():
        if name in plan.linears:
            hooks.append(module.register_forward_pre_hook(linear_hook(name)))
        elif name in plan.experts:
            hooks.append(module.register_forward_pre_hook(experts_hook(name)))
        elif kv_cache and isinstance(module, Attention) and not name.startswith("mtp."):
            hooks.append(module.k_proj.register_forward_hook(kv_hook(f"{name}.k_proj")))
            hooks.append(module.v_proj.register_forward_hook(kv_hook(f"{name}.v_proj")))
    try:
        with torch.inference_mode(), _progress(progress) as bar:
            task = bar.add_task("calibrating", total=len(batches)) if bar else None
            for ids in batches:
                model(ids.to(model.device))
                cal.tokens += ids.numel()
                if bar:
                    bar.advance(task)
    finally:
        for h in hooks:
            h.remove()
    missing = sorted(set(plan.linears) - set(cal.inputs))
    if missing:
        raise ValueError(
            f"no calibration data reached {len(missing)} quantized module(s) (first: {missing[0]}); "
            "the forward pass does not run them (MTP?): keep them BF16 in the recipe"
        )
    return cal


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _progress(enabled: bool):
    if not enabled:
        return _NoBar()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    transient=False)  # fmt: skip


# ------------------------------------------------------------------------------------------ quantize


def _quantize_matrix(w: torch.Tensor, fmt: str, amax: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """ModelOpt tensors (suffix → tensor) of one weight matrix, with the input scale when calibrated."""
    if fmt == "nvfp4":
        q = nvfp4_quantize(w)
        out = {"weight": q.weight, "weight_scale": q.weight_scale, "weight_scale_2": q.weight_scale_2}
        if amax is not None:
            out["input_scale"] = nvfp4_input_scale(amax)
        return out
    q = fp8_quantize(w)
    out = {"weight": q.weight, "weight_scale": q.weight_scale}
    if amax is not None:
        out["input_scale"] = fp8_input_scale(amax)
    return out


def _plain(name: str, t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if not t.is_floating_point():
        return t
    return t.to(torch.float32) if keeps_fp32(name) else t.to(torch.bfloat16)


def quantize_state(model: NemotronHForCausalLM, plan: QuantPlan, cal: Calibration | None, *,
                   kv_cache: bool = True, progress: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
    """The checkpoint's tensors by on-disk name, in model order: quantized per the plan, the rest BF16.

    Without a calibration (`cal=None`) no input_scale is written (weight-only, "W4A16_NVFP4" style).
    """
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    linear_of = {f"{m}.weight": m for m in plan.linears}
    total = sum(1 for n in state if n in linear_of) + sum(2 for _ in plan.experts)
    with torch.inference_mode(), _progress(progress) as bar:
        task = bar.add_task("quantizing", total=total) if bar else None
        for name, t in state.items():
            if name in linear_of:
                m = linear_of[name]
                amax = cal.inputs[m] if cal is not None else None
                for suffix, q in _quantize_matrix(t, plan.linears[m], amax).items():
                    out[f"{m}.{suffix}"] = q.cpu()
            elif (s := STACKED.match(name)) and s["prefix"] in plan.experts:
                m, proj = s["prefix"], s["proj"]
                fmt = plan.experts[m][proj]
                amax = cal.expert_amax(m, proj) if cal is not None else None
                for e in range(t.shape[0]):
                    qs = _quantize_matrix(t[e], fmt, None if amax is None else amax[e])
                    for suffix, q in qs.items():
                        out[f"{m}.{e}.{proj}.{suffix}"] = q.cpu()
            elif s:
                for e in range(t.shape[0]):
                    out[f"{s['prefix']}.{e}.{s['proj']}.weight"] = _plain(name, t[e]).cpu()
            else:
                out[name] = _plain(name, t).cpu()
                continue
            if bar:
                bar.advance(task)
    if kv_cache and cal is not None:
        for m, a in cal.kv.items():
            out[f"{m}.{m[-6]}_scale"] = fp8_input_scale(a) if a > 0 else torch.ones(())
    return out


def quant_config(model: NemotronHForCausalLM, plan: QuantPlan, *, kv_cache: bool = True,
                 weight_only: bool = False) -> QuantConfig:  # fmt: skip
    """hf_quant_config for the plan: one format → quant_algo + exclude_modules; several → MIXED_PRECISION."""
    algo = {"nvfp4": "W4A16_NVFP4" if weight_only else "NVFP4", "fp8": "FP8"}

    def spec(fmt: str) -> dict:
        return {"quant_algo": algo[fmt], "group_size": NVFP4_BLOCK} if fmt == "nvfp4" else {"quant_algo": algo[fmt]}

    layers: dict[str, dict] = {m: spec(f) for m, f in plan.linears.items()}
    for m, fmts in plan.experts.items():
        E = model.get_submodule(m).up_proj.shape[0]
        for e in range(E):
            for proj, f in fmts.items():
                layers[f"{m}.{e}.{proj}"] = spec(f)
    layers = dict(sorted(layers.items(), key=lambda kv: _natural(kv[0])))
    kv = "FP8" if kv_cache else None
    has_mtp = any(n.startswith("mtp.") for n, _ in model.named_modules())
    mtp = ["mtp*"] if has_mtp and not any(n.startswith("mtp.") for n in layers) else []
    formats = plan.formats
    if len(formats) > 1:
        return QuantConfig("MIXED_PRECISION", kv, None, mtp, layers)
    (fmt,) = formats or {"nvfp4"}
    exclude = []
    for m in plan.unquantized:
        if has_mtp and m.startswith("mtp.") and mtp:
            continue
        if isinstance(model.get_submodule(m), Experts):
            E = model.get_submodule(m).up_proj.shape[0]
            exclude += [f"{m}.{e}.{p}" for e in range(E) for p in ("up_proj", "down_proj")]
        else:
            exclude.append(m)
    return QuantConfig(algo[fmt], kv, NVFP4_BLOCK if fmt == "nvfp4" else None, sorted(exclude, key=_natural) + mtp)


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def save_quantized(state: dict[str, torch.Tensor], config: ModelConfig, qc: QuantConfig, dst: str | os.PathLike,
                   *, tokenizer_from: str | os.PathLike | None = None, max_shard_size: int | str = "5GB") -> Path:  # fmt: skip
    """Write the quantized state, config.json (+ quantization_config), hf_quant_config.json, tokenizer files."""
    import json

    dst = Path(dst)
    config = config.replace(extra={**config.extra, "quantization_config": qc.config_json_form()})
    save_checkpoint(state, config, dst, max_shard_size)
    (dst / HF_QUANT_CONFIG).write_text(json.dumps(qc.hf_quant_config(), indent=2) + "\n")
    if tokenizer_from is not None and Path(tokenizer_from).is_dir():
        copy_tokenizer_files(Path(tokenizer_from), dst)
    return dst


# ------------------------------------------------------------------------------------------ driver


@dataclass
class QuantizeResult:
    directory: Path
    recipe: str
    quant_algo: str
    calib_samples: int
    calib_tokens: int
    quantized_modules: int
    bytes_on_disk: int


def prepare_destination(dst: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a non-empty destination unless `overwrite` (then it is emptied)."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dst} exists and is not empty (use --overwrite to replace it)")
        shutil.rmtree(dst)
    dst.mkdir(parents=True, exist_ok=True)
    return dst


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, recipe: str | Recipe = "ultra", *,
                        calib: int = 16, seq_len: int = 256, calib_text: str | None = None, kv_cache: bool = True,
                        overwrite: bool = False, seed: int = 0, progress: bool = True) -> QuantizeResult:  # fmt: skip
    """Load SRC (a checkpoint directory or a preset) in float32, calibrate on `calib` windows of `seq_len`
    tokens, quantize with `recipe` and write DST. `calib=0` skips calibration (weight-only, no input_scale)."""
    from nemotron3.loader import load_model

    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if calib < 0 or seq_len < 1:
        raise ValueError(f"calib must be >= 0 and seq_len >= 1, got {calib}, {seq_len}")
    src_path = Path(src)
    if not src_path.is_dir() and os.sep in str(src):
        raise FileNotFoundError(f"{src}: no such checkpoint directory")
    text = None
    if calib_text is not None:
        path = Path(calib_text)
        if not path.is_file():
            raise FileNotFoundError(f"--calib-text {calib_text}: no such file")
        text = path.read_text(encoding="utf-8", errors="replace")
    if src_path.is_dir():
        from nemotron3.quant.load import is_quantized_checkpoint

        if is_quantized_checkpoint(src_path):
            raise ValueError(f"{src} is already quantized; dequantize it first (nemotron3 dequantize)")
    dst = prepare_destination(dst, overwrite)
    model = load_model(src, dtype=torch.float32)
    tokenizer = None
    if text is not None and src_path.is_dir() and (src_path / "tokenizer.json").is_file():
        from nemotron3.io.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(src_path)
    elif text is not None:
        warnings.warn("no tokenizer.json next to the model: calibrating on the text's UTF-8 bytes", stacklevel=2)
    plan = plan_model(model, recipe)
    cal = None
    if calib:
        batches = calibration_batches(calib, min(seq_len, model.config.max_position_embeddings),
                                      model.config.vocab_size, text=text, tokenizer=tokenizer, seed=seed)  # fmt: skip
        cal = calibrate(model, plan, batches, kv_cache=kv_cache, progress=progress)
    state = quantize_state(model, plan, cal, kv_cache=kv_cache, progress=progress)
    qc = quant_config(model, plan, kv_cache=kv_cache and cal is not None, weight_only=cal is None)
    save_quantized(state, model.config, qc, dst, tokenizer_from=src_path if src_path.is_dir() else None)
    size = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    n = len(plan.linears) + sum(model.get_submodule(m).up_proj.shape[0] * 2 for m in plan.experts)
    return QuantizeResult(dst, recipe.name, qc.quant_algo, calib, cal.tokens if cal else 0, n, size)


__all__ = [
    "FORMAT_ALGO",
    "Calibration",
    "QuantPlan",
    "QuantizeResult",
    "calibrate",
    "calibration_batches",
    "plan_model",
    "quant_config",
    "quantize_checkpoint",
    "quantize_state",
    "save_quantized",
]  # fmt: skip
