"""load_model: a checkpoint directory or a preset name → a ready NemotronHForCausalLM (DESIGN.md contract)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from nemotron3.config import DT_CLAMP_MODES, PRESETS, ModelConfig, preset
from nemotron3.default_model import resolve_model
from nemotron3.io.checkpoint import (
    CheckpointReader,
    check_against,
    check_memory,
    expected_disk_shapes,
    read_state,
    warn_missing_mtp,
)
from nemotron3.model.nemotron import NemotronHForCausalLM, keeps_fp32


def _target_dtypes(model: NemotronHForCausalLM, dtype: torch.dtype) -> dict[str, torch.dtype]:
    return {n: torch.float32 if keeps_fp32(n) else dtype for n in model.state_dict()}


def _bytes(model: NemotronHForCausalLM, dtypes: dict[str, torch.dtype]) -> int:
    return sum(t.numel() * dtypes[n].itemsize for n, t in model.state_dict().items())


def _build(config: ModelConfig) -> NemotronHForCausalLM:
    with torch.device("meta"):
        return NemotronHForCausalLM(config)


def load_model(
    path_or_preset: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    dt_clamp: str | None = None,
    seed: int = 0,
) -> NemotronHForCausalLM:
    """Load a `nemotron_h` checkpoint directory (config.json + safetensors), "default" (the embedded trained
    model), or build a preset with seeded random weights (tiny, nano-30b-a3b, super-120b-a12b,
    ultra-550b-a55b). Returns eval mode.

    dt_clamp: "checkpoint" (default: clamp Δ to config.time_step_limit, as NVIDIA/vLLM) or
    "transformers" (reproduce transformers 5.23's prefill-only clamp, for parity tests).
    """
    if dt_clamp is not None and dt_clamp not in DT_CLAMP_MODES:
        raise ValueError(f"dt_clamp must be one of {DT_CLAMP_MODES}, got {dt_clamp!r}")
    device = torch.device(device)
    path_or_preset = resolve_model(path_or_preset)
    path = Path(path_or_preset)
    if path.is_dir():
        from nemotron3.quant.load import is_quantized_checkpoint, load_quantized

        if is_quantized_checkpoint(path):  # ModelOpt NVFP4 / FP8 layout: packed weights stay packed
            return load_quantized(path, dtype=dtype, device=device, dt_clamp=dt_clamp)
        model = _load_dir(path, dtype, device, dt_clamp)
    elif str(path_or_preset) in PRESETS:
        model = _init_preset(str(path_or_preset), dtype, device, dt_clamp, seed)
    else:
        raise ValueError(
            f"{str(path_or_preset)!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})"
        )
    return model.eval()


def _load_dir(path: Path, dtype: torch.dtype, device: torch.device, dt_clamp: str | None) -> NemotronHForCausalLM:
    """config.json + safetensors → model: validate names/shapes and memory first, then read lazily
    into tensors that become the parameters directly (the model is built on `meta`, no double allocation)."""
    config = ModelConfig.from_json(path)
    if dt_clamp:
        config = config.replace(dt_clamp=dt_clamp)
    with CheckpointReader(path) as reader:
        config = reconcile_mtp(path, config, reader)
        model = _build(config)
        shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
        check_against(reader, expected_disk_shapes(shapes))
        dtypes = _target_dtypes(model, dtype)
        if device.type == "cpu":
            check_memory(_bytes(model, dtypes), f"loading {path} as {dtype}")
        model.load_state_dict(read_state(reader, shapes, dtypes, device), assign=True)
    _check_materialised(model, str(path))
    return model


def reconcile_mtp(path: Path, config: ModelConfig, reader: CheckpointReader) -> ModelConfig:
    """Drop the MTP block from the config when the checkpoint has no mtp.* tensors, and ignore mtp.*
    tensors the config does not declare (both with a warning)."""
    has_mtp = any(n.startswith("mtp.") for n in reader.names())
    if config.num_nextn_predict_layers and not has_mtp:
        warn_missing_mtp(path)
        config = config.replace(num_nextn_predict_layers=0)
    if has_mtp and not config.num_nextn_predict_layers:
        dropped = reader.drop("mtp.")
        warnings.warn(
            f"{path}: {len(dropped)} mtp.* tensors present but config.json declares no MTP layers "
            "(num_nextn_predict_layers = 0); ignoring them, as transformers does",
            stacklevel=4,
        )
    return config


def _check_materialised(model: NemotronHForCausalLM, what: str) -> None:
    """Every parameter and buffer must hold data after loading (none left on the meta device)."""
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"{what}: {len(left)} tensors were not materialised: {', '.join(left[:10])}")


def _init_preset(
    name: str, dtype: torch.dtype, device: torch.device, dt_clamp: str | None, seed: int
) -> NemotronHForCausalLM:
    config = preset(name)
    if dt_clamp:
        config = config.replace(dt_clamp=dt_clamp)
    model = _build(config)
    dtypes = _target_dtypes(model, dtype)
    if device.type == "cpu":
        check_memory(_bytes(model, dtypes), f"preset {name} at {dtype}")
    model.to_dtype(dtype)  # on the meta device: sets dtypes without allocating
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    model.init_weights(generator)
    return model
