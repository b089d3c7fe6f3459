"""Checkpoint I/O in the hub's `nemotron_h` safetensors layout (research/architecture.md §9).

On disk every tensor has its hub name (`backbone.*`, `lm_head.weight`, `mtp.layers.*`) and routed
experts are one tensor per expert (`…experts.{e}.up_proj.weight` [F, L]); in memory they are stacked
(`…experts.up_proj` [E, F, L]). Reading is lazy (safetensors `safe_open`, tensor by tensor) and is
validated against the model's expected names and shapes before anything is allocated.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nemotron3.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
EXPERT_DISK = re.compile(r"^(?P<prefix>.+\.mixer\.experts)\.(?P<e>\d+)\.(?P<proj>up_proj|down_proj)\.weight$")
STACKED = re.compile(r"^(?P<prefix>.+\.mixer\.experts)\.(?P<proj>up_proj|down_proj)$")
QUANT_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "k_scale", "v_scale")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model its config describes."""


def _human(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def available_memory() -> int:
    """Bytes of memory available for new allocations (Linux MemAvailable, else physical pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(needed: int, what: str) -> None:
    """Fail fast, before allocating, when `needed` bytes exceed what the machine has available."""
    have = available_memory()
    if needed > have:
        raise MemoryError(f"{what} needs {_human(needed)} of memory but only {_human(have)} is available")


# ------------------------------------------------------------------------------------------ names


def disk_names(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """On-disk (name, shape) pairs for one in-memory tensor: stacked experts split, the rest as is."""
    m = STACKED.match(name)
    if not m:
        return [(name, shape)]
    return [(f"{m['prefix']}.{e}.{m['proj']}.weight", tuple(shape[1:])) for e in range(shape[0])]


def memory_name(name: str) -> tuple[str, int | None]:
    """On-disk name → (in-memory name, expert index or None); drops a multimodal `language_model.` prefix."""
    name = name.removeprefix("language_model.")
    m = EXPERT_DISK.match(name)
    if not m:
        return name, None
    return f"{m['prefix']}.{m['proj']}", int(m["e"])


def stack_experts(disk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """On-disk (per-expert) state → in-memory state with experts stacked [E, …]; inverse of split_experts."""
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in disk.items():
        mem, e = memory_name(name)
        if e is not None:
            experts.setdefault(mem, {})[e] = tensor
    state: dict[str, torch.Tensor] = {}
    for name, tensor in disk.items():
        mem, e = memory_name(name)
        if e is None:
            state[mem] = tensor
        elif mem not in state:
            by_index = experts[mem]
            if sorted(by_index) != list(range(len(by_index))):
                raise CheckpointMismatchError(
                    f"{mem}: expert indices {sorted(by_index)} are not 0..{len(by_index) - 1}"
                )
            state[mem] = torch.stack([by_index[i] for i in range(len(by_index))])
    return state


def split_experts(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """In-memory state → on-disk (name, tensor) pairs, in order."""
    for name, tensor in state.items():
        m = STACKED.match(name)
        if m:
            for e in range(tensor.shape[0]):
                yield f"{m['prefix']}.{e}.{m['proj']}.weight", tensor[e]
        else:
            yield name, tensor


# ------------------------------------------------------------------------------------------ reading


class CheckpointReader:
    """Lazy access to the tensors of a safetensors checkpoint directory (sharded or single file)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.directory / SINGLE_FILE).is_file():
            with safe_open(self.directory / SINGLE_FILE, framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            raise FileNotFoundError(f"no {INDEX_FILE} or {SINGLE_FILE} in {self.directory}")
        # multimodal wrappers prefix every name with `language_model.` (vLLM and SGLang strip it too)
        self.files = {n.removeprefix("language_model."): (n, f) for n, f in weight_map.items()}
        self._open: dict[str, object] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}

    def _handle(self, filename: str):  # returns a safetensors handle (its type is private)
        """The open (memory-mapped) handle of one shard, opened on first use."""
        if filename not in self._open:
            path = self.directory / filename
            if not path.is_file():
                raise FileNotFoundError(f"{path} is named in {INDEX_FILE} but does not exist")
            self._open[filename] = safe_open(path, framework="pt")
        return self._open[filename]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the memory maps of every shard opened so far."""
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()

    def names(self) -> set[str]:
        """Every tensor name in the checkpoint (on-disk names, `language_model.` stripped)."""
        return set(self.files)

    def drop(self, prefix: str) -> list[str]:
        """Forget the tensors whose names start with `prefix` (e.g. "mtp."); returns the dropped names."""
        dropped = sorted(n for n in self.files if n.startswith(prefix))
        for name in dropped:
            del self.files[name]
        return dropped

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype string) from the file header, without reading the data."""
        if name not in self._meta:
            stored, filename = self.files[name]
            sl = self._handle(filename).get_slice(stored)
            self._meta[name] = (tuple(sl.get_shape()), sl.get_dtype())
        return self._meta[name]

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor (only its bytes) from its shard, as stored."""
        stored, filename = self.files[name]
        return self._handle(filename).get_tensor(stored)


def check_against(reader: CheckpointReader, expected: dict[str, tuple[int, ...]]) -> None:
    """One CheckpointMismatchError listing every missing, unexpected and mis-shaped tensor."""
    on_disk = reader.names()
    quantized = sorted(n for n in on_disk if n.rsplit(".", 1)[-1] in QUANT_SUFFIXES)
    quantized += sorted(n for n in on_disk & set(expected) if reader.meta(n)[1] not in FLOAT_DTYPES)
    if quantized:
        raise CheckpointMismatchError(
            f"{reader.directory} is a quantized (ModelOpt) checkpoint ({quantized[0]}: "
            f"{reader.meta(quantized[0])[1]}, {len(quantized)} such tensors) without a quantization config: "
            "nemotron3.quant loads quantized checkpoints when config.json has a quantization_config or an "
            "hf_quant_config.json is present"
        )
    missing = sorted(set(expected) - on_disk)
    unexpected = sorted(on_disk - set(expected))
    bad_shape = [
        f"{n}: checkpoint {list(reader.meta(n)[0])}, model {list(expected[n])}"
        for n in sorted(on_disk & set(expected))
        if reader.meta(n)[0] != tuple(expected[n])
    ]
    if not (missing or unexpected or bad_shape):
        return
    parts = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape)):
        if items:
            shown = "\n    ".join(items[:20]) + (f"\n    … and {len(items) - 20} more" if len(items) > 20 else "")
            parts.append(f"  {len(items)} {title}:\n    {shown}")
    raise CheckpointMismatchError(f"{reader.directory} does not match its config.json:\n" + "\n".join(parts))


def expected_disk_shapes(state_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """In-memory name → shape, turned into the on-disk name → shape a checkpoint must hold."""
    return {dn: ds for n, s in state_shapes.items() for dn, ds in disk_names(n, s)}


def read_state(
    reader: CheckpointReader,
    state_shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, torch.dtype],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Materialise every in-memory tensor from the checkpoint at its target dtype, experts stacked."""
    state = {}
    for name, shape in state_shapes.items():
        m = STACKED.match(name)
        if m:
            out = torch.empty(shape, dtype=dtypes[name], device=device)
            for e in range(shape[0]):
                out[e].copy_(reader.tensor(f"{m['prefix']}.{e}.{m['proj']}.weight"))
        else:
            out = reader.tensor(name).to(device=device, dtype=dtypes[name])
        state[name] = out
    return state


# ------------------------------------------------------------------------------------------ writing


def _parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB" (10⁹, as transformers) or "2GiB" (2³⁰)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*", size)
    if not m:
        raise ValueError(f"max_shard_size: cannot read {size!r}; use bytes or e.g. '5GB'")
    unit = {"B": 1, None: 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[m[2]]
    return int(float(m[1]) * unit)


def plan_shards(state: dict[str, torch.Tensor], limit: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Group the on-disk (name, tensor) pairs, in order, into shards of at most `limit` bytes each
    (a single tensor larger than `limit` gets a shard of its own). Tensors are views, not copies."""
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, tensor in split_experts(state):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size += nbytes
    return shards


def save_checkpoint(
    model_or_state: torch.nn.Module | dict[str, torch.Tensor],
    config: ModelConfig,
    directory: str | os.PathLike,
    max_shard_size: int | str = "5GB",
) -> None:
    """Write config.json and safetensors shards in the hub layout (what transformers and vLLM load).

    One `model.safetensors` when everything fits one shard, else `model-0000k-of-0000n.safetensors`
    plus `model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map"}), as HF writes.
    Shards are materialised on the CPU one at a time, so a GPU model needs one shard of host memory.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    meta = [n for n, t in state.items() if t.device.type == "meta"]
    if meta:
        raise ValueError(f"cannot save tensors on the meta device (no data): {', '.join(meta[:5])}")
    shards = plan_shards(state, _parse_size(max_shard_size))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in list(directory.glob("model*.safetensors")) + [directory / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    names = [SINGLE_FILE] if len(shards) == 1 else [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]  # fmt: skip
    weight_map, total = {}, 0
    for filename, shard in zip(names, shards):
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in shard}
        save_file(tensors, directory / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, filename))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config.to_json(directory)


def warn_missing_mtp(directory: Path) -> None:
    warnings.warn(
        f"{directory}: config.json declares MTP layers but the checkpoint has no mtp.* tensors "
        "(transformers drops them when saving); loading without the MTP block",
        stacklevel=3,
    )
