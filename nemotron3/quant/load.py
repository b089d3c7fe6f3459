"""Quantized checkpoints (ModelOpt "unified HF" layout): the quantization config, loading, BF16 export.

A directory is quantized when it holds `hf_quant_config.json` or its config.json has a
`quantization_config` (research/nvfp4.md §3). Both spellings of the config are read:

    hf_quant_config.json   {"producer": …, "quantization": {"quant_algo", "kv_cache_quant_algo", "group_size",
                            "exclude_modules" | "quantized_layers" (quant_algo "MIXED_PRECISION")}}
    config.json            "quantization_config": {"quant_method": "modelopt", "quant_algo", "ignore",
                            "quantized_layers", "kv_cache_scheme", "config_groups", …}

Loading (`load_quantized`, called by `nemotron3.load_model`): the tensors decide which modules are
quantized: a Linear whose `weight` is U8 is NVFP4, F8_E4M3 is FP8; the config is cross-checked (a module
stored quantized that the config names unquantized, or in another format, is reported). Quantized Linear
modules become `NVFP4Linear` / `FP8Linear` and routed experts a `QuantizedExperts` (weights stay packed:
W4A16 / W8A16; `input_scale`s are kept but activations are not quantized). KV scales (`k_scale`,
`v_scale`) are accepted and ignored: the KV cache runs in the model dtype. Everything else loads as
`nemotron3.loader` does (validated names/shapes, memory check, built on `meta`, read lazily).

Default dequantization strategies, measured on this machine (2 CPU threads, torch 2.13; full tables in
docs/quantization.md, produced by `python -m nemotron3.quant.linear` and `python -m nemotron3.quant.experts`):

* Linear layers: "layer" (dequantize the whole weight, then one matmul) against "tile" (dequantize a
  1 MiB block of output rows inside the matmul loop), median ms per forward:

      weight [out, in] | rows | fp32 dense | nvfp4 layer | nvfp4 tile | fp8 layer | fp8 tile
      2048 x 2048      |    1 |     0.80   |     31.9    |    248.1   |    32.2   |   252.0
      2048 x 2048      |  512 |    63.7    |     92.7    |    632.9   |    82.8   |   632.9
      32000 x 512      |    1 |     6.4    |     84.3    |     94.0   |   117.4   |   155.3
      32000 x 512      |  512 |   251.8    |    323.3    |   2495.5   |   651.6   |  2290.5

  "layer" wins in every case (the per-tile dequantization calls cost more than the cache locality
  gains), so LINEAR_STRATEGY = "layer".
* Routed experts: "active" (the experts that received tokens dequantized in one call), against
  "expert" and "layer"; numbers in nemotron3/quant/experts.py. EXPERT_STRATEGY = "active".

`dequantize_checkpoint` writes a plain `nemotron_h` checkpoint (BF16 by default) from a quantized one,
tensor by tensor from the packed values, with no model built.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nemotron3.config import ModelConfig
from nemotron3.io.checkpoint import (
    STACKED,
    CheckpointMismatchError,
    CheckpointReader,
    check_memory,
    disk_names,
    read_state,
    save_checkpoint,
)
from nemotron3.model.moe import Experts
from nemotron3.model.nemotron import NemotronHForCausalLM, keeps_fp32
from nemotron3.quant.experts import DEFAULT_STRATEGY as EXPERT_STRATEGY
from nemotron3.quant.experts import QuantizedExperts, StackedQuantWeight
from nemotron3.quant.fp8 import FP8_DTYPE, as_scale, fp8_dequantize
from nemotron3.quant.linear import FP8Linear, NVFP4Linear
from nemotron3.quant.nvfp4 import NVFP4_BLOCK, nvfp4_dequantize

HF_QUANT_CONFIG = "hf_quant_config.json"
LINEAR_STRATEGY = "layer"
MIXED = "MIXED_PRECISION"
# ModelOpt per-layer algorithm → our weight format. W4A16_NVFP4 is NVFP4 without input_scale.
ALGO_FORMAT = {"NVFP4": "nvfp4", "W4A16_NVFP4": "nvfp4", "FP8": "fp8"}
FORMAT_ALGO = {"nvfp4": "NVFP4", "fp8": "FP8"}
DISK_FORMAT = {"U8": "nvfp4", "F8_E4M3": "fp8"}  # safetensors dtype of a quantized `weight`
QUANT_TENSORS = ("weight_scale", "weight_scale_2", "input_scale")
KV_SCALES = ("k_scale", "v_scale")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")  # fmt: skip


# ------------------------------------------------------------------------------------------ config


@dataclass
class QuantConfig:
    """One checkpoint's quantization config, whichever file it came from."""

    quant_algo: str  # "NVFP4", "FP8", "W4A16_NVFP4", … or "MIXED_PRECISION"
    kv_cache_quant_algo: str | None = None
    group_size: int | None = None
    exclude_modules: list[str] = field(default_factory=list)  # fnmatch patterns (single format; MTP in mixed)
    quantized_layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # MIXED_PRECISION only
    producer: dict[str, str] = field(default_factory=lambda: {"name": "nemotron3", "version": _version()})

    @property
    def mixed(self) -> bool:
        return self.quant_algo == MIXED

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> QuantConfig:
        """From hf_quant_config.json (a `quantization` key) or config.json's `quantization_config`."""
        producer = raw.get("producer") or {}
        q = raw.get("quantization", raw)
        method = raw.get("quant_method")
        if method not in (None, "modelopt"):
            raise ValueError(
                f"quantization_config.quant_method is {method!r}: only ModelOpt checkpoints (quant_method "
                "'modelopt') are read; compressed-tensors NVFP4 uses other tensor names (research/nvfp4.md §3.4)"
            )
        algo = q.get("quant_algo")
        if not algo:
            raise ValueError("the quantization config names no quant_algo")
        kv = q.get("kv_cache_quant_algo")
        scheme = q.get("kv_cache_scheme")
        if kv is None and isinstance(scheme, dict) and scheme.get("num_bits") == 8 and scheme.get("type") == "float":
            kv = "FP8"
        exclude = q.get("exclude_modules")
        if exclude is None:
            exclude = q.get("ignore") or []
        layers = q.get("quantized_layers") or {}
        if algo == MIXED and not layers:
            raise ValueError("a MIXED_PRECISION quantization config needs a quantized_layers map")
        return cls(str(algo), kv, q.get("group_size"), list(exclude), dict(layers), producer or cls().producer)

    def algo_for(self, module: str) -> str | None:
        """The quant_algo the config gives a module (on-disk name, e.g. `…experts.3.up_proj`), or None."""
        if self.mixed:
            if module in self.quantized_layers:
                return self.quantized_layers[module]["quant_algo"]
            parents = [p for p in self.quantized_layers if module.startswith(p + ".")]
            if parents:  # vLLM resolves a FusedMoE parent ("…experts") by prefix
                return self.quantized_layers[max(parents, key=len)]["quant_algo"]
            return None
        return None if excluded(module, self.exclude_modules) else self.quant_algo

    def hf_quant_config(self) -> dict[str, Any]:
        """hf_quant_config.json as ModelOpt writes it (single format or MIXED_PRECISION)."""
        q: dict[str, Any] = {"quant_algo": self.quant_algo, "kv_cache_quant_algo": self.kv_cache_quant_algo}
        if self.mixed:
            q["quantized_layers"] = self.quantized_layers
            if self.exclude_modules:
                q["exclude_modules"] = self.exclude_modules
        else:
            if self.group_size is not None:
                q["group_size"] = self.group_size
            q["exclude_modules"] = self.exclude_modules
        return {"producer": self.producer, "quantization": q}

    def config_json_form(self) -> dict[str, Any]:
        """config.json `quantization_config` (ModelOpt's convert_hf_quant_config_format shape)."""

        def scheme(algo: str) -> dict[str, Any]:
            bits = 4 if ALGO_FORMAT.get(algo) == "nvfp4" else 8
            spec: dict[str, Any] = {"dynamic": False, "num_bits": bits, "type": "float"}
            if bits == 4:
                spec["group_size"] = NVFP4_BLOCK
            group: dict[str, Any] = {"weights": spec}
            if algo != "W4A16_NVFP4":
                group["input_activations"] = dict(spec)
            return group

        out: dict[str, Any] = {"quant_method": "modelopt", "quant_algo": self.quant_algo, "producer": self.producer,
                               "kv_cache_quant_algo": self.kv_cache_quant_algo}  # fmt: skip
        if self.kv_cache_quant_algo == "FP8":
            out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
        if self.mixed:
            by_algo: dict[str, list[str]] = {}
            for name, spec in self.quantized_layers.items():
                by_algo.setdefault(spec["quant_algo"], []).append(name)
            out["config_groups"] = {f"group_{i}": {**scheme(a), "targets": sorted(names)}
                                    for i, (a, names) in enumerate(sorted(by_algo.items()))}  # fmt: skip
            out["quantized_layers"] = self.quantized_layers
            out["ignore"] = list(self.exclude_modules)
        else:
            out["config_groups"] = {"group_0": {**scheme(self.quant_algo), "targets": ["Linear"]}}
            out["ignore"] = list(self.exclude_modules)
            if self.group_size is not None:
                out["group_size"] = self.group_size
        return out


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("nemotron3")
    except Exception:  # noqa: BLE001 - not installed: any version string will do
        return "0"


def excluded(module: str, patterns: list[str]) -> bool:
    """Whether an exclude pattern covers `module`. A plain `X*` means X and X.* (as vLLM rewrites it, so
    `backbone.layers.5*` does not swallow layer 50); other patterns are fnmatch globs; a plain name also
    covers its children."""
    for p in patterns:
        if p.endswith("*") and not any(c in p[:-1] for c in "*?["):
            stem = p[:-1].rstrip(".")
            if module == stem or module.startswith(stem + "."):
                return True
        elif fnmatch.fnmatchcase(module, p) or module.startswith(p + "."):
            return True
    return False


def read_quant_config(directory: str | os.PathLike) -> QuantConfig | None:
    """The quantization config of a checkpoint directory (hf_quant_config.json first), or None."""
    directory = Path(directory)
    hf = directory / HF_QUANT_CONFIG
    if hf.is_file():
        return QuantConfig.from_dict(json.loads(hf.read_text()))
    cfg = directory / "config.json"
    if cfg.is_file():
        qc = json.loads(cfg.read_text()).get("quantization_config")
        if qc:
            return QuantConfig.from_dict(qc)
    return None


def is_quantized_checkpoint(directory: str | os.PathLike) -> bool:
    directory = Path(directory)
    if (directory / HF_QUANT_CONFIG).is_file():
        return True
    cfg = directory / "config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text()).get("quantization_config"))


# ------------------------------------------------------------------------------------------ loading


@dataclass
class _Plan:
    kind: str  # "linear" or "experts"
    formats: tuple[str, ...]  # linear: (fmt,); experts: (up fmt, down fmt)
    shape: tuple[int, ...]  # in-memory weight shape: linear [out, in]; experts: up [E, F, L]


def _disk_format(reader: CheckpointReader, name: str) -> str | None:
    return DISK_FORMAT.get(reader.meta(name)[1]) if name in reader.files else None


def plan_modules(model: nn.Module, reader: CheckpointReader) -> dict[str, _Plan]:
    """Which modules the checkpoint stores quantized, from the dtypes of their `weight` tensors."""
    plans: dict[str, _Plan] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            fmt = _disk_format(reader, f"{name}.weight")
            if fmt:
                plans[name] = _Plan("linear", (fmt,), tuple(module.weight.shape))
        elif isinstance(module, Experts):
            E = module.up_proj.shape[0]
            fmts = {proj: {_disk_format(reader, f"{name}.{e}.{proj}.weight") for e in range(E)}
                    for proj in ("up_proj", "down_proj")}  # fmt: skip
            if all(f == {None} for f in fmts.values()):
                continue
            bad = [p for p, f in fmts.items() if len(f) != 1 or None in f]
            if bad:
                raise CheckpointMismatchError(
                    f"{name}: routed experts must all be stored in one quantized format per projection; "
                    f"{', '.join(f'{p}: {sorted(map(str, fmts[p]))}' for p in bad)} is not supported"
                )
            plans[name] = _Plan(
                "experts", (fmts["up_proj"].pop(), fmts["down_proj"].pop()), tuple(module.up_proj.shape)
            )
    return plans


def _quant_expected(name: str, fmt: str, out_f: int, in_f: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """On-disk name → (shape, safetensors dtype) of one quantized linear (input_scale is optional)."""
    if fmt == "nvfp4":
        return {f"{name}.weight": ((out_f, in_f // 2), "U8"),
                f"{name}.weight_scale": ((out_f, in_f // NVFP4_BLOCK), "F8_E4M3"),
                f"{name}.weight_scale_2": ((), "F32")}  # fmt: skip
    return {f"{name}.weight": ((out_f, in_f), "F8_E4M3"), f"{name}.weight_scale": ((), "F32")}


def _check(reader: CheckpointReader, plain: dict[str, tuple[int, ...]],
           quant: dict[str, tuple[tuple[int, ...], str]], optional: set[str]) -> None:  # fmt: skip
    """One CheckpointMismatchError listing every missing, unexpected, mis-shaped or mis-typed tensor."""
    on_disk = reader.names()
    expected = set(plain) | set(quant)
    missing = sorted(expected - on_disk)
    unexpected = sorted(n for n in on_disk - expected - optional if n.rsplit(".", 1)[-1] not in KV_SCALES)
    bad = []
    for n in sorted(on_disk & set(plain)):
        shape, dt = reader.meta(n)
        if shape != tuple(plain[n]):
            bad.append(f"{n}: checkpoint {list(shape)}, model {list(plain[n])}")
        elif dt in DISK_FORMAT:
            bad.append(f"{n}: {dt}, but its module is not stored quantized")
    for n in sorted(on_disk & (set(quant) | optional)):
        shape, dt = reader.meta(n)
        want_shape, want_dt = quant.get(n, ((), "F32"))
        scalar = want_shape == () and shape in ((), (1,))
        if (shape != want_shape and not scalar) or dt != want_dt:
            bad.append(f"{n}: checkpoint {dt} {list(shape)}, expected {want_dt} {list(want_shape)}")
    if not (missing or unexpected or bad):
        return
    parts = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape or dtype", bad)):
        if items:
            shown = "\n    ".join(items[:20]) + (f"\n    … and {len(items) - 20} more" if len(items) > 20 else "")
            parts.append(f"  {len(items)} {title}:\n    {shown}")
    raise CheckpointMismatchError(f"{reader.directory} does not match its config.json:\n" + "\n".join(parts))


def _check_config(qc: QuantConfig | None, plans: dict[str, _Plan], E: dict[str, int], directory: Path) -> None:
    """Cross-check the stored formats against the quantization config."""
    if qc is None:
        return
    unsupported, problems = [], []
    for name, plan in plans.items():
        modules = ([(name, plan.formats[0])] if plan.kind == "linear" else
                   [(f"{name}.{e}.{p}", f) for e in range(E[name]) for p, f in zip(("up_proj", "down_proj"), plan.formats)])  # fmt: skip
        for module, fmt in modules:
            algo = qc.algo_for(module)
            if algo is None:
                problems.append(f"{module} is stored {fmt} but the config leaves it unquantized")
            elif algo not in ALGO_FORMAT:
                unsupported.append(f"{module}: quant_algo {algo!r}")
            elif ALGO_FORMAT[algo] != fmt:
                problems.append(f"{module} is stored {fmt} but the config says {algo}")
    if unsupported:
        raise CheckpointMismatchError(
            f"{directory}: {len(unsupported)} modules use a quantization this loader does not read "
            f"(first: {unsupported[0]}); supported: {sorted(ALGO_FORMAT)}"
        )
    if problems:
        warnings.warn(
            f"{directory}: the quantization config disagrees with the stored tensors ({len(problems)} modules; "
            f"first: {problems[0]}); loading what the tensors hold",
            stacklevel=3,
        )


def _scalar(reader: CheckpointReader, name: str) -> torch.Tensor | None:
    return as_scale(reader.tensor(name), name) if name in reader.files else None


def _read_linear(reader: CheckpointReader, name: str, fmt: str, bias: torch.Tensor | None,
                 device: torch.device) -> nn.Module:  # fmt: skip
    w = reader.tensor(f"{name}.weight").to(device)
    inp = _scalar(reader, f"{name}.input_scale")
    if fmt == "nvfp4":
        return NVFP4Linear.from_packed(w, reader.tensor(f"{name}.weight_scale").to(device),
                                       _scalar(reader, f"{name}.weight_scale_2"), bias, input_scale=inp,
                                       strategy=LINEAR_STRATEGY)  # fmt: skip
    return FP8Linear.from_packed(w, _scalar(reader, f"{name}.weight_scale"), bias, input_scale=inp,
                                 strategy=LINEAR_STRATEGY)  # fmt: skip


def _read_stacked(reader: CheckpointReader, prefix: str, proj: str, E: int, fmt: str,
                  device: torch.device) -> StackedQuantWeight:  # fmt: skip
    names = [f"{prefix}.{e}.{proj}" for e in range(E)]
    weight = torch.stack([reader.tensor(f"{n}.weight") for n in names]).to(device)
    scale = (torch.stack([reader.tensor(f"{n}.weight_scale") for n in names]) if fmt == "nvfp4"
             else torch.stack([_scalar(reader, f"{n}.weight_scale") for n in names]))  # fmt: skip
    s2 = torch.stack([_scalar(reader, f"{n}.weight_scale_2") for n in names]) if fmt == "nvfp4" else None
    inputs = [_scalar(reader, f"{n}.input_scale") for n in names]
    inp = torch.stack(inputs) if all(i is not None for i in inputs) else None
    return StackedQuantWeight(fmt, weight, scale.to(device), None if s2 is None else s2.to(device),
                              None if inp is None else inp.to(device))  # fmt: skip


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def load_quantized(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   dt_clamp: str | None = None) -> NemotronHForCausalLM:  # fmt: skip
    """A quantized checkpoint directory → model with NVFP4Linear / FP8Linear / QuantizedExperts modules.

    Unquantized tensors load at `dtype` (FP32_TENSORS stay float32), quantized ones stay packed; every
    quantized module dequantizes to its input's dtype on the fly. Returns the model in eval mode.
    """
    from nemotron3.loader import _build, _check_materialised, reconcile_mtp

    path, device = Path(path), torch.device(device)
    qc = read_quant_config(path)
    config = ModelConfig.from_json(path)
    if dt_clamp:
        config = config.replace(dt_clamp=dt_clamp)
    with CheckpointReader(path) as reader:
        config = reconcile_mtp(path, config, reader)
        model = _build(config)
        plans = plan_modules(model, reader)
        E = {n: p.shape[0] for n, p in plans.items() if p.kind == "experts"}
        covered: set[str] = set()  # in-memory state names replaced by quantized modules
        quant: dict[str, tuple[tuple[int, ...], str]] = {}
        optional: set[str] = set()
        for name, plan in plans.items():
            if plan.kind == "linear":
                covered.add(f"{name}.weight")
                quant.update(_quant_expected(name, plan.formats[0], *plan.shape))
                optional.add(f"{name}.input_scale")
            else:
                _, F_, L = plan.shape
                for proj, fmt, (o, i) in zip(("up_proj", "down_proj"), plan.formats, ((F_, L), (L, F_))):
                    covered.add(f"{name}.{proj}")
                    for e in range(plan.shape[0]):
                        quant.update(_quant_expected(f"{name}.{e}.{proj}", fmt, o, i))
                        optional.add(f"{name}.{e}.{proj}.input_scale")
        shapes = {n: tuple(t.shape) for n, t in model.state_dict().items() if n not in covered}
        plain = {dn: ds for n, s in shapes.items() for dn, ds in disk_names(n, s)}
        _check(reader, plain, quant, optional)
        _check_config(qc, plans, E, path)
        dtypes = {n: torch.float32 if keeps_fp32(n) else dtype for n in shapes}
        if device.type == "cpu":
            needed = sum(int(torch.Size(s).numel()) * dtypes[n].itemsize for n, s in shapes.items())
            needed += sum(int(torch.Size(s).numel()) * (1 if d in DISK_FORMAT else 4) for s, d in quant.values())
            check_memory(needed, f"loading {path} (quantized)")
        for name, plan in plans.items():
            if plan.kind == "linear":
                bias_name = f"{name}.bias"
                bias = reader.tensor(bias_name).to(device=device, dtype=dtype) if bias_name in shapes else None
                shapes.pop(bias_name, None)
                _set_module(model, name, _read_linear(reader, name, plan.formats[0], bias, device))
            else:
                up = _read_stacked(reader, name, "up_proj", plan.shape[0], plan.formats[0], device)
                down = _read_stacked(reader, name, "down_proj", plan.shape[0], plan.formats[1], device)
                _set_module(model, name, QuantizedExperts(up, down, EXPERT_STRATEGY))
        state = read_state(reader, shapes, dtypes, device)
        model.load_state_dict(state, strict=False, assign=True)
    _check_materialised(model, str(path))
    model.quant_config = qc  # kept for inspection and re-export
    return model.eval()


def quantized_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of weights by storage: {"nvfp4": …, "fp8": …, "other": …} (parameters and buffers)."""
    out = {"nvfp4": 0, "fp8": 0, "other": 0}
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, NVFP4Linear | FP8Linear):
            out["nvfp4" if isinstance(module, NVFP4Linear) else "fp8"] += module.quantized_nbytes()
            seen.update(id(t) for t in (module.weight, module.weight_scale, module.weight_scale_2) if t is not None)
        elif isinstance(module, StackedQuantWeight):
            out[module.format] += module.nbytes()
            seen.update(id(t) for t in (module.weight, module.weight_scale, module.weight_scale_2) if t is not None)
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen and t is not None:
            out["other"] += t.numel() * t.element_size()
    return out


# ------------------------------------------------------------------------------------------ export


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def dequantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
                          max_shard_size: int | str = "5GB") -> Path:  # fmt: skip
    """Quantized checkpoint → plain `nemotron_h` checkpoint with every weight dequantized to `dtype`.

    Tensors are processed by on-disk name (no model is built): a quantized `weight` becomes
    e2m1·s_b·s2 (NVFP4) or fp8·s (FP8) computed in float32 and rounded once to `dtype`; scales and KV
    scales are dropped; other floating tensors are cast to `dtype`, except the FP32_TENSORS
    (A_log, D, dt_bias, e_score_correction_bias), which keep their stored dtype.
    """
    src, dst = Path(src), Path(dst)
    if not is_quantized_checkpoint(src):
        raise ValueError(f"{src} is not a quantized checkpoint (no {HF_QUANT_CONFIG}, no quantization_config)")
    config = ModelConfig.from_json(src)
    config = config.replace(extra={k: v for k, v in config.extra.items() if k != "quantization_config"})
    state: dict[str, torch.Tensor] = {}
    with CheckpointReader(src) as reader:
        names = list(reader.files)
        quantized = {n.rsplit(".", 1)[0]: DISK_FORMAT[reader.meta(n)[1]]
                     for n in names if n.endswith(".weight") and reader.meta(n)[1] in DISK_FORMAT}  # fmt: skip
        nbytes = sum(int(torch.Size(reader.meta(n)[0]).numel()) for n in names) * dtype.itemsize * 4
        check_memory(nbytes, f"dequantizing {src}")
        for n in names:
            module, _, suffix = n.rpartition(".")
            if suffix in KV_SCALES or (module in quantized and suffix in QUANT_TENSORS):
                continue
            if module in quantized and suffix == "weight":
                w = reader.tensor(n)
                if quantized[module] == "nvfp4":
                    state[n] = nvfp4_dequantize(w, reader.tensor(f"{module}.weight_scale").view(FP8_DTYPE),
                                                _scalar(reader, f"{module}.weight_scale_2"), dtype)  # fmt: skip
                else:
                    state[n] = fp8_dequantize(w, _scalar(reader, f"{module}.weight_scale"), dtype)
                continue
            t = reader.tensor(n)
            state[n] = t if not t.is_floating_point() or keeps_fp32(n) else t.to(dtype)
    save_checkpoint(state, config, dst, max_shard_size)
    (dst / HF_QUANT_CONFIG).unlink(missing_ok=True)
    copy_tokenizer_files(src, dst)
    return dst


def dense_copy(model: NemotronHForCausalLM, dtype: torch.dtype = torch.float32) -> NemotronHForCausalLM:
    """The same model with every quantized module replaced by a dense one holding its dequantized weights
    (in place; returns the model). Used by tests and benchmarks as the exact reference."""
    for name, module in list(model.named_modules()):
        if isinstance(module, NVFP4Linear | FP8Linear):
            _set_module(model, name, module.to_linear(dtype))
        elif isinstance(module, QuantizedExperts):
            up, down = module.dequantize(dtype)
            dense = Experts(up.shape[0], up.shape[2], up.shape[1])
            dense.up_proj, dense.down_proj = nn.Parameter(up), nn.Parameter(down)
            _set_module(model, name, dense)
    return model


__all__ = [
    "HF_QUANT_CONFIG",
    "STACKED",
    "QuantConfig",
    "dense_copy",
    "dequantize_checkpoint",
    "excluded",
    "is_quantized_checkpoint",
    "load_quantized",
    "quantized_weight_bytes",
    "read_quant_config",
]  # fmt: skip
