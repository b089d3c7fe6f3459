"""Training checkpoints: everything needed to resume bit-exactly, in safetensors + JSON (never pickles).

A checkpoint is a directory `step_000123/` holding
    model.safetensors      the module's state_dict as is (fp32 master weights, stacked experts)
    optimizer.safetensors  AdamW moments and step counts, keyed `{param name}.{state key}`
    rng.safetensors        torch's CPU (and CUDA) generator states
    state.json             step, data position, schedule scale, spike history, run bookkeeping
It is written to a temporary directory and renamed, so a crash never leaves a half-written checkpoint
that resume would pick up. The exported model (nemotron_h format) is separate: `io.checkpoint`.

Under torch.distributed every rank writes its own shards (`model-rank{r}.safetensors`, … : the local
pieces of FSDP DTensors and of its experts) and rank 0 the JSON; such a checkpoint resumes with the same
world size. (A full, unsharded model is what `Pretrainer.export` writes.)
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


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a (possibly FSDP-sharded DTensor) tensor, detached, contiguous, on the CPU."""
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.detach().contiguous().cpu().clone()


def _assign(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a saved local piece into `target` (a plain tensor or this rank's shard of a DTensor)."""
    local = target.to_local() if hasattr(target, "to_local") else target
    if local.shape != value.shape:
        raise ValueError(f"checkpoint shard shape {tuple(value.shape)} != {tuple(local.shape)} (same world size?)")
    local.copy_(value)


def _suffix(rank: int, world_size: int) -> str:
    return "" if world_size == 1 else f"-rank{rank}"


def optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state as named tensors: `{param}.{exp_avg|exp_avg_sq|step}` (this rank's pieces)."""
    by_param = {id(p): name for name, p in model.named_parameters()}
    out = {}
    for param, state in optimizer.state.items():
        name = by_param[id(param)]
        for key, value in state.items():
            out[f"{name}.{key}"] = _local(value) if torch.is_tensor(value) else torch.tensor(value)
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
        param = params[name]
        if hasattr(param, "device_mesh"):  # FSDP2: moments are DTensors sharded like their parameter
            from torch.distributed.tensor import DTensor

            state = {k: DTensor.from_local(v, param.device_mesh, param.placements) if v.dim() else v
                     for k, v in state.items()}  # fmt: skip
        optimizer.state[param] = state


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


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def save_training_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
    rank: int = 0,
    world_size: int = 1,
) -> Path:
    """Write checkpoint `step` under `root` atomically and delete all but the newest `keep`.

    A collective under torch.distributed: every rank calls it and writes its own shards."""
    final = checkpoint_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(world_size)
    sfx = _suffix(rank, world_size)
    save_file({k: _local(v) for k, v in model.state_dict().items()}, tmp / f"model{sfx}.safetensors")
    save_file(optimizer_tensors(model, optimizer), tmp / f"optimizer{sfx}.safetensors")
    save_file(rng_tensors(), tmp / f"rng{sfx}.safetensors")
    _barrier(world_size)
    if rank == 0:
        (tmp / "state.json").write_text(
            json.dumps({**state, "world_size": world_size}, indent=1) + "\n", encoding="utf-8"
        )
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(world_size)
    return final


def load_training_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0, world_size: int = 1
) -> dict[str, Any]:
    """Restore model, optimizer and RNG from `path` in place (this rank's shards); returns the JSON state."""
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    saved_world = state.get("world_size", 1)
    if saved_world != world_size:
        raise ValueError(
            f"checkpoint {path} was written by {saved_world} process(es); resume it with the same number, not {world_size}"
        )
    sfx = _suffix(rank, world_size)
    weights = load_file(path / f"model{sfx}.safetensors")
    current = model.state_dict()
    missing, unexpected = sorted(set(current) - set(weights)), sorted(set(weights) - set(current))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, value in weights.items():
            _assign(current[name], value)
    load_optimizer_tensors(model, optimizer, load_file(path / f"optimizer{sfx}.safetensors"))
    restore_rng(load_file(path / f"rng{sfx}.safetensors"))
    return state
