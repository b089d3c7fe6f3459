"""Loading benchmarks/<name>.py as a module in a test, and putting everything back afterwards."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[2]


def benchmark_module(name: str, *also_loaded: str) -> Iterator[ModuleType]:
    """benchmarks/<name>.py as a module (it puts benchmarks/ on sys.path for its `common`); restores sys.path,
    the thread count and sys.modules (the module, `common`, and the benchmark modules named in also_loaded)
    afterwards. A generator, for module-scoped fixtures."""
    threads, path = torch.get_num_threads(), list(sys.path)
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    for mod in (name, "common", *also_loaded):
        sys.modules.pop(mod, None)
    sys.path[:] = path
    torch.set_num_threads(threads)
