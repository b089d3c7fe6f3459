"""Training checkpoints: everything needed to resume bit-exactly, in safetensors + JSON (never pickles).

A checkpoint is a directory `step_000123/` holding
    model.safetensors      the module's state_dict as is (fp32 master weights, stacked experts)
    optimizer.safetensors  AdamW moments and step counts, keyed `{param name}.{state key}`
    rng.safetensors        torch's CPU (and CUDA) generator states
    state.json             step, data position, schedule scale, spike history, run bookkeeping
It is written to a temporary directory and renamed, so a crash never leaves a half-written checkpoint
that resume would pick up. The exported model (nemotron_h format) is separate: `io.checkpoint`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

STEP_PREFIX = "step_"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"{STEP_PREFIX}{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state as named tensors: `{param}.{exp_avg|exp_avg_sq|step}`."""
    by_param = {id(p): name for name, p in model.named_parameters()}
    out = {}
    for param, state in optimizer.state.items():
        name = by_param[id(param)]
        for key, value in state.items():
            out[f"{name}.{key}"] = (
                value.detach().clone().contiguous() if torch.is_tensor(value) else torch.tensor(value)
            )
    return out


def load_optimizer_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]
) -> None:
    """Inverse of optimizer_tensors: fills the optimizer's per-parameter state in place."""
    params = dict(model.named_parameters())
    optimizer.state.clear()
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, field = key.rsplit(".", 1)
        if name not in params:
            raise ValueError(f"optimizer state for unknown parameter {name!r}")
        grouped.setdefault(name, {})[field] = value.to(params[name].device)
    for name, state in grouped.items():
        optimizer.state[params[name]] = state


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = state
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_training_checkpoint(
    root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int
) -> Path:
    """Write checkpoint `step` under `root` atomically and delete all but the newest `keep`."""
    final = checkpoint_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    save_file(optimizer_tensors(model, optimizer), tmp / "optimizer.safetensors")
    save_file(rng_tensors(), tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG from `path` in place; returns the JSON state."""
    weights = load_file(path / "model.safetensors")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    load_optimizer_tensors(model, optimizer, load_file(path / "optimizer.safetensors"))
    restore_rng(load_file(path / "rng.safetensors"))
    return json.loads((path / "state.json").read_text(encoding="utf-8"))
