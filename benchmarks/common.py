"""Shared pieces of the benchmarks: the model configs of research/perf.md §2, weights, timing, RSS, JSON.

Configs (fp32, random weights, untied lm_head; perf.md §2):

    nemo50     vocab 32000, H 512,  pattern MEME*EME (3 Mamba-2, 1 attention, 4 LatentMoE)      55.4 M params
    nemo300    vocab 32000, H 1024, pattern MEME*EMEMEME*EME (6 M, 2 attention, 8 E)            316.7 M params
    nemo50-attn   the attention-only twin of nemo50: every Mamba layer (M) becomes attention (*), so the
                  pattern is *E*E*E*E: same width, same depth, same MoE layers, 4 attention layers
    tiny50 / tiny300 / tiny50-attn   very small stand-ins with the same patterns, for the smoke test

Weights are made once by transformers' own random init (`torch.manual_seed(0)`) and saved as a plain
safetensors file of HF's in-memory state dict; every worker process loads that file, HF as is and ours
with `model.` → `backbone.` (routed experts are stacked identically in memory). So both engines run
exactly the same numbers.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nemotron3.config import ModelConfig, pattern_to_kinds

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
BANDWIDTH_GBS = 35.0  # perf.md §1: fp32 read/copy bandwidth of the CI machine, 2 threads
GEMV_GBS = 23.0  # perf.md §1: what torch's fp32 GEMV reaches from DRAM
THREADS = 2
MAX_LEN = 33 * 1024 + 512  # room for a 32k prompt plus the decoded tokens

# --------------------------------------------------------------------------------------------- configs

_COMMON = {
    "vocab_size": 32000, "conv_kernel": 4, "chunk_size": 128, "head_dim": 64, "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 4, "tie_word_embeddings": False, "max_position_embeddings": MAX_LEN,
    "dt_clamp": "transformers", "eos_token_id": 2,
}  # fmt: skip


def nemo50(pattern: str = "MEME*EME") -> ModelConfig:
    return ModelConfig(
        **_COMMON, hidden_size=512, layers_block_type=pattern_to_kinds(pattern), num_attention_heads=8,
        num_key_value_heads=2, mamba_num_heads=16, mamba_head_dim=64, ssm_state_size=64, n_groups=2,
        n_routed_experts=16, moe_intermediate_size=384, moe_shared_expert_intermediate_size=768,
        moe_latent_size=256, intermediate_size=1536,
    )  # fmt: skip


def nemo300(pattern: str = "MEME*EME" * 2) -> ModelConfig:
    return ModelConfig(
        **_COMMON, hidden_size=1024, layers_block_type=pattern_to_kinds(pattern), num_attention_heads=16,
        num_key_value_heads=4, mamba_num_heads=32, mamba_head_dim=64, ssm_state_size=128, n_groups=4,
        n_routed_experts=32, moe_intermediate_size=640, moe_shared_expert_intermediate_size=1536,
        moe_latent_size=512, intermediate_size=3072,
    )  # fmt: skip


def tiny(pattern: str = "MEME*EME", hidden: int = 64) -> ModelConfig:
    return ModelConfig(
        vocab_size=512, hidden_size=hidden, layers_block_type=pattern_to_kinds(pattern), num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2,
        conv_kernel=4, chunk_size=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48, moe_latent_size=32, intermediate_size=96,
        max_position_embeddings=MAX_LEN, dt_clamp="transformers", eos_token_id=2,
    )  # fmt: skip


def attention_only(pattern: str) -> str:
    """The attention-only twin of a hybrid pattern: every Mamba layer becomes an attention layer."""
    return pattern.replace("M", "*")


CONFIGS = {
    "nemo50": lambda: nemo50(),
    "nemo300": lambda: nemo300(),
    "nemo50-attn": lambda: nemo50(attention_only("MEME*EME")),
    "tiny50": lambda: tiny(),
    "tiny300": lambda: tiny("MEME*EME" * 2, hidden=96),
    "tiny50-attn": lambda: tiny(attention_only("MEME*EME")),
}


def config(name: str) -> ModelConfig:
    return CONFIGS[name]()


def random_model(name: str):
    """Our model of a named config with random weights (init_weights, seed 0), in eval mode."""
    from nemotron3.model import NemotronHForCausalLM

    model = NemotronHForCausalLM(config(name))
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


def hf_config(mc: ModelConfig):
    """transformers' NemotronHConfig with the same fields (sdpa attention, as perf.md §2)."""
    from transformers import NemotronHConfig

    cfg = {k: v for k, v in mc.to_dict().items() if k not in ("architectures", "model_type")}
    hc = NemotronHConfig(**cfg)
    hc._attn_implementation = "sdpa"
    return hc


def describe(mc: ModelConfig) -> dict[str, Any]:
    """The config fields that matter for speed, for the JSON."""
    keys = [
        "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "mamba_num_heads",
        "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "chunk_size", "n_routed_experts",
        "num_experts_per_tok", "moe_intermediate_size", "moe_shared_expert_intermediate_size", "moe_latent_size",
    ]  # fmt: skip
    out = {"pattern": mc.hybrid_override_pattern, **{k: getattr(mc, k) for k in keys}}
    out["params"] = param_count(mc)
    return out


# --------------------------------------------------------------------------------------------- weights


def make_weights_in_subprocess(name: str, path: Path) -> Path:
    """make_weights in a child process, so the orchestrating process never holds a model (its memory
    would otherwise show up in every worker's ru_maxrss, which execve keeps)."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import common; "
        f"common.make_weights({name!r}, common.Path({str(path)!r}))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"))
    return path


def make_weights(name: str, path: Path) -> Path:
    """transformers' random init under manual_seed(0), saved as HF's in-memory state dict (safetensors)."""
    from safetensors.torch import save_file
    from transformers import NemotronHForCausalLM as HFModel

    if path.exists():
        return path
    torch.manual_seed(0)
    hf = HFModel(hf_config(config(name))).eval()
    state = {k: v.detach().contiguous() for k, v in hf.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.rename(path)
    return path


_ST_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file straight into fresh tensors (no mmap, no second copy).

    Memory-mapping would count the file's pages in this process's peak RSS on top of the tensors;
    reading each tensor with readinto keeps the peak at one copy of the weights.
    """
    out = {}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        base = 8 + n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            t = torch.empty(meta["shape"], dtype=_ST_DTYPES[meta["dtype"]])
            f.seek(base + start)
            view = memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
            if f.readinto(view) != end - start:
                raise OSError(f"{path}: short read for {name}")
            out[name] = t
    return out


def load_ours(name: str, path: Path):
    """Our NemotronHForCausalLM with the saved weights (built on the meta device, weights assigned)."""
    from nemotron3.model.nemotron import NemotronHForCausalLM

    state = {k.replace("model.", "backbone.", 1): v for k, v in _load_state(path).items()}
    with torch.device("meta"):
        model = NemotronHForCausalLM(config(name))
    model.load_state_dict(state, assign=True, strict=True)
    _check_materialized(model)
    return model.eval()


def load_hf(name: str, path: Path):
    """transformers' NemotronHForCausalLM with the saved weights, sdpa attention."""
    from transformers import NemotronHForCausalLM as HFModel

    with torch.device("meta"):
        model = HFModel(hf_config(config(name)))
    model.load_state_dict(_load_state(path), assign=True, strict=True)
    _check_materialized(model)
    return model.eval()


def _check_materialized(model: torch.nn.Module) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left[:5]}")


# --------------------------------------------------------------------------------------------- bytes per step


def param_count(mc: ModelConfig) -> int:
    with torch.device("meta"):
        from nemotron3.model.nemotron import NemotronHForCausalLM

        m = NemotronHForCausalLM(mc)
    return sum(p.numel() for p in m.parameters())


def decode_bytes(
    mc: ModelConfig, context: int, batch: int = 1, distinct_experts: float | None = None, matrix_elt: int = 4
) -> dict[str, float]:
    """Bytes one decode step must read (fp32), as perf.md §2 counts them.

    Dense weights (everything but the embedding table and the routed experts, lm_head included), the
    embedding rows looked up, the routed experts actually used (distinct per MoE layer; top-k at batch 1),
    the K/V cache read (`context` tokens per sequence) and the Mamba SSM + conv state read and written.
    matrix_elt = 2 counts the matrices that weight-only bf16 narrows (engine/runner.py narrow_weight_storage:
    projections, routers, lm_head, routed experts) at 2 bytes.
    """
    with torch.device("meta"):
        from nemotron3.model.nemotron import NemotronHForCausalLM

        m = NemotronHForCausalLM(mc)
    elt = 4
    dense = 0  # bytes
    expert = 0  # elements
    for name, p in m.named_parameters():
        if name.startswith("mtp."):
            continue
        if name == "backbone.embeddings.weight":
            continue
        if ".experts." in name and name.endswith(("up_proj", "down_proj")):
            expert += p.numel()
            continue
        matrix = name.endswith(("proj.weight", "lm_head.weight", "gate.weight"))
        dense += p.numel() * (matrix_elt if matrix else elt)
    kinds = mc.layers_block_type
    n_moe = sum(k == "moe" for k in kinds)
    n_attn = sum(k == "full_attention" for k in kinds)
    n_mamba = sum(k == "linear_attention" for k in kinds)
    per_expert = expert // max(1, n_moe * mc.n_routed_experts)
    used = (
        distinct_experts if distinct_experts is not None else min(mc.n_routed_experts, batch * mc.num_experts_per_tok)
    )
    kv = batch * n_attn * 2 * mc.num_key_value_heads * context * mc.head_dim * elt
    ssm = (
        batch
        * n_mamba
        * 2
        * (
            mc.mamba_num_heads * mc.mamba_head_dim * mc.ssm_state_size * 4
            + mc.mamba_conv_dim * (mc.conv_kernel - 1) * elt
        )
    )
    lm_head = mc.vocab_size * mc.hidden_size * matrix_elt
    out = {
        "dense_weights": dense,
        "lm_head": lm_head,
        "embedding_rows": batch * mc.hidden_size * elt,
        "routed_experts": n_moe * used * per_expert * matrix_elt,
        "distinct_experts_per_layer": used,
        "kv_cache": kv,
        "ssm_conv_state": ssm,
    }
    out["total"] = out["dense_weights"] + out["embedding_rows"] + out["routed_experts"] + kv + ssm
    out["roofline_ms"] = out["total"] / (BANDWIDTH_GBS * 1e9) * 1e3
    return out


# --------------------------------------------------------------------------------------------- timing


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def peak_rss_mib() -> float:
    """This process's peak resident set in MiB.

    Linux's VmHWM (the high-water mark of this address space) where available: `ru_maxrss` survives
    execve, so a worker started by a parent that once held more memory would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return maxrss_mib()


def maxrss_mib() -> float:
    """getrusage(RUSAGE_SELF).ru_maxrss in MiB (KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0


# --------------------------------------------------------------------------------------------- processes


def cpu_busy_s() -> float | None:
    """CPU seconds spent busy by the whole machine so far (all CPUs, /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def foreign_load(seconds: float = 0.5) -> float | None:
    """Average number of CPUs busy over `seconds` (nothing of ours runs meanwhile)."""
    a = cpu_busy_s()
    time.sleep(seconds)
    b = cpu_busy_s()
    return None if a is None or b is None else (b - a) / seconds


def wait_quiet(max_wait_s: float, threshold: float = 0.3) -> tuple[float, float | None]:
    """Wait (up to max_wait_s) until other processes use < threshold CPUs; return (waited s, last load)."""
    t0 = time.perf_counter()
    load = foreign_load(0.3)
    while load is not None and load > threshold and time.perf_counter() - t0 < max_wait_s:
        load = foreign_load(1.0)
    return time.perf_counter() - t0, load


def run_worker(script: Path, spec: dict, timeout: float, quiet_wait_s: float = 0.0, python: str | None = None) -> dict:
    """Run one scenario in a fresh process (so ru_maxrss is that scenario's peak); return its JSON.

    Also records how much CPU *other* processes used meanwhile (`foreign_cpus`: the machine's busy CPU
    seconds minus the worker's own, per wall second). On this 2-vCPU VM a second busy process stalls
    torch's 2-thread OpenMP regions and can slow small ops 10x or more (perf.md §6). `python`: the
    interpreter (default: this one; bench_llamacpp.py may run llama.cpp's worker under another venv's).
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env["HF_HUB_OFFLINE"] = "1"
    waited, load_before = wait_quiet(quiet_wait_s) if quiet_wait_s > 0 else (0.0, None)
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0 = cpu_busy_s()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [python or sys.executable, str(script), "--worker", json.dumps(spec)],
            check=False, capture_output=True, text=True, timeout=timeout, env=env,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "spec": spec, "process_wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1 = cpu_busy_s()
    own = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {"error": f"worker exited {proc.returncode}: {tail}", "spec": spec, "process_wall_s": wall}
    out = json.loads(lines[-1])
    out["process_wall_s"] = wall
    out["quiet_wait_s"] = waited
    out["foreign_load_before"] = load_before
    out["foreign_cpus"] = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0 - own) / wall)
    return out


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        mem = None
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_bytes": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": THREADS,
        "platform": platform.platform(),
        "bandwidth_gbs_assumed": BANDWIDTH_GBS,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display), or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_png(plt, fig, path: Path) -> None:
    """Lay out, write (making the directory) and close a figure."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(x: float | None, nd: int = 1) -> str:
    """x with nd decimals, or "-" for a missing value (summary lines)."""
    return "-" if x is None else f"{x:.{nd}f}"


def write_results(out: str | Path, result: dict, plot) -> dict:
    """Write `result` to <out>.json and plot(result, <out>.png) (out: a path without suffix); returns result."""
    out = Path(out)
    write_json(out.with_suffix(".json"), result)
    plot(result, out.with_suffix(".png"))
    return result


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")
