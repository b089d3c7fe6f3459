"""keep_freed_memory: freed blocks of tens of MB stay in the heap for reuse (glibc) instead of being returned to
the OS and faulted in again; an engine on the CPU applies it; NEMOTRON3_KEEP_FREED_MEMORY=0 leaves malloc alone.

Each case runs in a fresh process (the setting is process-wide and applied once). The workload is a prefill's
pattern in miniature: six tensors of 30 and 2 MB alive together, then freed, four times over; the minor page
faults of rounds 2-4 are counted (measured: ~500 with the setting, ~55,000 without)."""

import json
import os
import platform
import subprocess
import sys

import pytest

SCRIPT = """
import json, resource, sys, torch
from nemotron3.engine import host_memory
if sys.argv[1] == "engine":
    from nemotron3 import LLM
    from nemotron3.config import preset
    from nemotron3.model import NemotronHForCausalLM
    LLM(NemotronHForCausalLM(preset("tiny")), kv_cache_memory_bytes=4 << 20)
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    live = [torch.ones(n // 4) for n in [30 << 20, 2 << 20] * 3]
    del live
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": host_memory._applied, "faults": sum(faults[1:])}))
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc thresholds"
)


def run(mode: str, env_value: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NEMOTRON3_KEEP_FREED_MEMORY"}
    if env_value is not None:
        env["NEMOTRON3_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_an_engine_keeps_freed_memory_for_reuse():
    kept, untouched = run("engine"), run("plain")
    assert kept["applied"] is True and untouched["applied"] is None  # only an engine applies it
    assert kept["faults"] * 10 < untouched["faults"]


@glibc_only
def test_the_environment_turns_it_off():
    off = run("engine", env_value="0")
    assert off["applied"] is False and off["faults"] > 5000
