"""Build, load and call the fused CPU decode kernels in cpu_decode.c (float32 math, OpenMP).

cpu_decode.c and cpu_program.c (a whole decode step replayed in one call, engine/decode_program.py) are
compiled once per machine with the system C compiler (`cc -O3 -march=native -fopenmp`) into one library in
~/.cache/nemotron3/kernels (or $NEMOTRON3_CACHE_DIR/kernels), keyed by a hash of the sources, the compiler
and the CPU's feature flags, then loaded with ctypes. torch is imported first, so the library binds the
libgomp.so.1 torch already loaded: one OpenMP thread pool, sized by torch.set_num_threads.

Everything here is optional: with no compiler, a failed build, NEMOTRON3_NATIVE=0, or inputs the kernels do
not take (not float32, not on the CPU, autograd on), callers fall back to the torch code, which computes the
same math. `available()` says which path runs. The weight-streaming kernels (`linear`, `experts`,
`route_experts`) also read bfloat16 weights, widened to float32 in registers (weight-only bf16).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

# the kernels, and the decode-step program that replays them (engine/decode_program.py): one library
SOURCES = [Path(__file__).with_name(f) for f in ("cpu_decode.c", "cpu_program.c", "cpu_amx.c")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_amx_allowed = True  # allow_amx

_p, _i, _f, _n = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "nm3_experts": (ctypes.c_int, [_p, _i, _i, _i, _p, _p, _n, _i, _i, _p, _p, _i, _p, _i, _n]),
    "nm3_mamba_step": (
        None,
        [_i, _p, _p, _p, _p, _i, _p, _p, _p, _p, _p, _p, _p, _p, _i, _i, _i, _i, _i, _i, _i, _f, _f, _f, _p, _p, _n],
    ),
    "nm3_route_experts": (
        ctypes.c_int, [_p, _i, _p, _i, _n, _f, _p, _p, _p, _i, _i, _i, _p, _p, _n, _i, _i, _p, _i, _n],
    ),
    "nm3_decode_attention": (ctypes.c_int, [_i, _p, _i, _p, _p, _n, _i, _p, _p, _i, _i, _i, _i, _f, _p, _n]),
    "nm3_add_rms_norm": (None, [_p, _p, _p, _f, _i, _i, _p, _n]),
    "nm3_relu2_rows": (None, [_p, _i, _p, _i, _i, _i, _n]),
    "nm3_linear": (ctypes.c_int, [_p, _i, _i, _p, _n, _i, _i, _i, _p, _p, _i, _i, _n]),
    "nm3_run_program": (ctypes.c_int, [_p, _i, _i, _p, _n]),
    "nm3_moe_dispatch": (ctypes.c_int, [_p, _i, _p, _i, _n, _f, _i, _i, _p, _i, _i, _p, _p, _p, _p, _n]),
    "nm3_moe_combine": (None, [_p, _i, _p, _p, _i, _i, _p, _i, _n]),
    "nm3_mamba_prefill": (
        ctypes.c_int, [_i, _p, _i, _p, _p, _p, _p, _p, _p, _p, _p, _i, _i, _i, _i, _i, _i, _i, _i, _f, _f, _f, _p, _i, _n],
    ),
    "nm3_ssd_scan": (ctypes.c_int, [_i, _i, _i, _i, _i, _i, _p, _i, _p, _i, _p, _p, _i, _p, _i, _p, _p, _n]),
    "nm3_prefill_attention": (ctypes.c_int, [_i, _i, _p, _i, _p, _p, _i, _i, _i, _i, _f, _p, _i, _n]),
    "nm3_amx_init": (ctypes.c_int, []),
    "nm3_bf16_dot_available": (ctypes.c_int, []),
    "nm3_bf16_allow_amx": (None, [_n]),
    "nm3_matmul_bf16": (ctypes.c_int, [_p, _i, _i, _i, _p, _n, _n, _i, _i, _p, _p, _i, _n, _n]),
}
# Rows (tokens) up to which `linear` runs natively, and the decode program's widest step; more go to MKL's GEMM.
# The kernel reads the weights from memory once for any number of rows (one pass for up to 8; beyond, L2-sized
# blocks that every group of 8 rows passes over). Up to 8 rows against MKL, whole steps A/B: nemo50 / nemo300
# batch 8 13.9 -> 11.0 ms and 67.4 -> 51.4 ms. Beyond (benchmarks/bench_decode_batch.py): MKL reads a
# [16 x 512] x [512 x 32,000] lm_head at ~6 GB/s, and a nemo50 step of 16 rows took 31 ms on the per-op path
# against 16 ms in the program (whole engine steps); at 96-128 rows the two were level, so 64 (the default max_num_seqs) is the limit.
LINEAR_MAX_ROWS = 64
LINEAR_KSPLIT_BYTES = 32768  # nm3_linear splits rows, not columns, over threads whose column strip is narrower
_WEIGHT_FLAG = {torch.float32: 0, torch.bfloat16: 1}  # the kernels' w_bf16 argument per weight dtype


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("NEMOTRON3_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nemotron3")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build(force: bool = False, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile cpu_decode.c (if not already cached) and return the shared library's path; raises on failure.

    extra_flags: appended to FLAGS (tests build the portable C path with `-mno-avx512f`)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    flags = [*FLAGS, *extra_flags]
    texts = [src.read_text() for src in SOURCES]
    key = hashlib.sha256("\0".join([*texts, cc, version, " ".join(flags), _cpu_flags()]).encode())
    out = _cache_dir() / f"cpu_decode-{key.hexdigest()[:16]}.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = Path(tmp) / out.name
        cmd = [cc, *flags, *map(str, SOURCES), "-o", str(tmp_so), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {' and '.join(src.name for src in SOURCES)} failed:\n{proc.stderr.strip()}")
        os.replace(tmp_so, out)  # atomic: concurrent builders never see a half-written library
    return out


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None when disabled (NEMOTRON3_NATIVE=0) or they cannot be built here."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if os.environ.get("NEMOTRON3_NATIVE", "1") not in ("0", "false", "no", "off"):
            try:
                _lib = load(build())
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                warnings.warn(f"nemotron3: native CPU kernels unavailable, using torch ops ({e})", stacklevel=2)
        _tried = True
    return _lib


def load(path: Path) -> ctypes.CDLL:
    """Open a built library and declare its functions' C signatures."""
    lib = ctypes.CDLL(str(path))
    for name, (res, args) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def use(lib: ctypes.CDLL | None) -> None:
    """Make `lib` the library every call uses (tests: the portable build)."""
    global _lib, _tried
    with _lock:
        _lib, _tried = lib, True


def available() -> bool:
    return library() is not None


def reset() -> None:
    """Forget the loaded library so the next call re-reads NEMOTRON3_NATIVE (tests)."""
    global _lib, _tried
    with _lock:
        _lib, _tried = None, False


def _usable(*tensors: torch.Tensor) -> bool:
    """float32 CPU tensors, and no autograd recording through them (checked cheaply: ~1 µs for a few)."""
    for t in tensors:
        if t.dtype is not torch.float32 or not t.is_cpu:
            return False
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [T, L] as the kernels read it: unit stride along L, any row stride (else one copy)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _weight_type(*weights: torch.Tensor) -> int | None:
    """The kernels' bf16 flag (_WEIGHT_FLAG) for streamed tensors (weights, or a K/V pool) that are all float32
    or all bfloat16 CPU tensors without autograd recording; None otherwise."""
    flag = _WEIGHT_FLAG.get(weights[0].dtype)
    if flag is None or any(w.dtype is not weights[0].dtype or not w.is_cpu for w in weights):
        return None
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        return None
    return flag


def experts(
    x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor | None:
    """Routed experts for a few tokens in one call: [T, L] float32, or None when the kernel cannot run.

    x: [T, L] (rows may be strided); up: [E, F, L] and down: [E, L, F] (contiguous, float32 or both bfloat16);
    indices: [T, k] int64; weights: [T, k] fp32.
    """
    lib = library()
    w_bf16 = _weight_type(up, down)
    if lib is None or w_bf16 is None or not _usable(x, weights) or not (up.is_contiguous() and down.is_contiguous()):
        return None
    x = _rows(x)
    indices = indices.to(torch.int64).contiguous()
    weights = weights.contiguous()
    T, L = x.shape
    E, F_, _ = up.shape
    out = torch.empty(T, L, dtype=torch.float32)
    rc = lib.nm3_experts(
        x.data_ptr(), x.stride(0), T, L, up.data_ptr(), down.data_ptr(), w_bf16, E, F_, indices.data_ptr(),
        weights.data_ptr(), indices.shape[1], out.data_ptr(), L, torch.get_num_threads(),
    )  # fmt: skip
    if rc == -1:
        raise ValueError(f"expert index out of range [0, {E}): {indices.min().item()}..{indices.max().item()}")
    if rc != 0:
        raise MemoryError("nm3_experts: allocation failed")
    return out


def route_experts(
    logits: torch.Tensor, bias: torch.Tensor, top_k: int, norm_topk_prob: bool, scaling: float, x: torch.Tensor,
    up: torch.Tensor, down: torch.Tensor,
) -> torch.Tensor | None:  # fmt: skip
    """moe.route (n_group = 1) then `experts`, in one call: [T, L] float32, or None when the kernel cannot run.

    logits: [T, E] router logits and x [T, L] (rows may be strided, e.g. slices of a fused projection); bias: [E]
    float32; up / down as for `experts`.
    """
    lib = library()
    w_bf16 = _weight_type(up, down)
    if (
        lib is None
        or w_bf16 is None
        or not _usable(logits, bias, x)
        or logits.stride(-1) != 1
        or not (up.is_contiguous() and down.is_contiguous() and bias.is_contiguous())
    ):
        return None
    x = _rows(x)
    T, L = x.shape
    E, F_, _ = up.shape
    idx = torch.empty(T, top_k, dtype=torch.int64)
    w = torch.empty(T, top_k, dtype=torch.float32)
    out = torch.empty(T, L, dtype=torch.float32)
    rc = lib.nm3_route_experts(
        logits.data_ptr(), logits.stride(0), bias.data_ptr(), top_k, int(norm_topk_prob), scaling, idx.data_ptr(),
        w.data_ptr(), x.data_ptr(), x.stride(0), T, L, up.data_ptr(), down.data_ptr(), w_bf16, E, F_, out.data_ptr(), L,
        torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("nm3_route_experts: allocation failed")
    return out


def moe_dispatch(
    logits: torch.Tensor, bias: torch.Tensor, top_k: int, norm_topk_prob: bool, scaling: float, x: torch.Tensor
) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """A prefill's MoE routing (moe.route, n_group = 1) and grouping in one call: (xs [T·k, L], the token count of
    each expert, where [T·k], routing weights [T, k]), or None where the kernel cannot run. xs holds the inputs of
    every (token, slot) pair sorted by expert (stably), so expert e's rows are the e-th block of `counts`;
    where[t·k + j] is the row of pair (t, j). logits [T, E] and x [T, L] may have strided rows."""
    lib = library()
    if lib is None or not _usable(logits, bias, x) or logits.stride(-1) != 1 or not bias.is_contiguous():
        return None
    x = _rows(x)
    T, L = x.shape
    E = logits.shape[1]
    xs = torch.empty(T * top_k, L, dtype=torch.float32)
    counts = torch.empty(E, dtype=torch.int64)
    where = torch.empty(T * top_k, dtype=torch.int64)
    w = torch.empty(T, top_k, dtype=torch.float32)
    rc = lib.nm3_moe_dispatch(
        logits.data_ptr(), logits.stride(0), bias.data_ptr(), top_k, int(norm_topk_prob), scaling, T, E, x.data_ptr(),
        x.stride(0), L, xs.data_ptr(), counts.data_ptr(), where.data_ptr(), w.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("nm3_moe_dispatch: scratch allocation failed")
    return xs, counts.tolist(), where, w


def moe_combine(ys: torch.Tensor, where: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """out[t] = Σ_j w[t, j] · ys[where[t·k + j]] (moe_dispatch's order), written into `out` [T, L] (rows may be
    strided, e.g. columns of a wider buffer). ys [T·k, L] contiguous float32."""
    T, k = w.shape
    if not (ys.is_contiguous() and out.stride(-1) == 1 and ys.shape == (T * k, out.shape[1])):
        raise ValueError(f"moe_combine: ys {tuple(ys.shape)} does not match w {tuple(w.shape)} and out {tuple(out.shape)}")
    library().nm3_moe_combine(
        ys.data_ptr(), ys.shape[1], where.data_ptr(), w.data_ptr(), T, k, out.data_ptr(), out.stride(0),
        torch.get_num_threads(),
    )  # fmt: skip


def _mamba_static(mixer) -> tuple | None:
    """The mixer's parameter pointers and sizes for nm3_mamba_step, built once and kept on the mixer while
    its parameters keep their storage (a replaced parameter or `.data` rebuilds them); None if the parameters
    are not contiguous float32 (or autograd records through them)."""
    params = (
        mixer.conv1d._parameters["weight"], mixer.conv1d._parameters["bias"], mixer._parameters["dt_bias"],
        mixer._parameters["A_log"], mixer._parameters["D"], mixer.norm._parameters["weight"],
    )  # fmt: skip
    ptrs = tuple(t.data_ptr() if t is not None else 0 for t in params)
    cached = mixer.__dict__.get("_native_static")
    if cached is not None and cached[0] == ptrs:  # same storage: in-place updates are seen, new tensors are not
        return cached[1]
    tensors = [t for t in params if t is not None]
    if not _usable(*tensors) or not all(t.is_contiguous() for t in tensors):
        return None
    conv_w = params[0].detach().reshape(mixer.conv_dim, -1)  # a view: the kernel reads the parameter itself
    bias = params[1]
    static = (
        conv_w.data_ptr(), bias.data_ptr() if bias is not None else None, *(t.data_ptr() for t in params[2:]),
        mixer.conv_dim, mixer.kernel, mixer.num_heads, mixer.head_dim, mixer.state_size, mixer.n_groups,
        mixer.norm.groups,
    )  # fmt: skip
    mixer.__dict__["_native_static"] = (ptrs, static)
    return static


def mamba_step(
    mixer, proj: torch.Tensor, slots: torch.Tensor, conv_pool: torch.Tensor, ssm_pool: torch.Tensor,
    dt_range: tuple[float, float],
) -> torch.Tensor | None:  # fmt: skip
    """A Mamba2Mixer's decode step (conv, SSM recurrence, D skip, gated norm) for b sequences in one call.

    proj: [b, I + C + nh] float32 in_proj output rows (z | xbc | dt); slots: [b] int64 state slots;
    conv_pool [S, C, K-1] and ssm_pool [S, nh, P, N] (float32, contiguous) advance in place.
    dt_range: (lo, hi) clamp of Δ. Returns the normed output [b, I], or None when the kernel cannot run.
    """
    lib = library()
    if lib is None or not _usable(proj, conv_pool, ssm_pool) or proj.stride(-1) != 1:
        return None
    static = _mamba_static(mixer)
    if static is None or not (conv_pool.is_contiguous() and ssm_pool.is_contiguous()):
        return None
    b = proj.shape[0]
    base, I, C = proj.data_ptr(), mixer.inner, mixer.conv_dim
    u = torch.empty(b, C, dtype=torch.float32)
    out = torch.empty(b, I, dtype=torch.float32)
    lib.nm3_mamba_step(
        b, slots.data_ptr(), base + 4 * I, base, base + 4 * (I + C), proj.stride(0), conv_pool.data_ptr(),
        ssm_pool.data_ptr(), *static, dt_range[0], dt_range[1], mixer.norm.eps, u.data_ptr(), out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out


MAMBA_OUTPUTS = ("all", "last", "none")


def mamba_prefill(
    mixer, proj: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, dt_range: tuple[float, float],
    outputs: str = "all",
) -> torch.Tensor | None:  # fmt: skip
    """A Mamba2Mixer's prefill of one sequence (conv, SiLU, SSD scan, D skip, gated norm: `mix` with decode=False)
    in one call, advancing both states in place: the normed output [t, I] float32, or None where the kernel
    cannot run.

    proj: [t, I + C + nh] in_proj output rows (z | xbc | dt), unit stride within a row; conv_state [C, K-1] and
    ssm_state [nh, P, N] contiguous float32 (one pool slot each); dt_range: (lo, hi) clamp of Δ. outputs "last"
    returns the last token's row only [1, I] (computed from the final state, so the scan forms no outputs) and
    "none" [0, I] (the states only); z is read only in the rows returned.
    """
    if outputs not in MAMBA_OUTPUTS:
        raise ValueError(f"outputs must be one of {MAMBA_OUTPUTS}, got {outputs!r}")
    lib = library()
    if lib is None or proj.dim() != 2 or not _usable(proj, conv_state, ssm_state) or proj.stride(-1) != 1:
        return None
    static = _mamba_static(mixer)
    if static is None or not (conv_state.is_contiguous() and ssm_state.is_contiguous()):
        return None
    t = proj.shape[0]
    outs = {"all": t, "last": min(t, 1), "none": 0}[outputs]
    out = torch.empty(outs, mixer.inner, dtype=torch.float32)
    rc = lib.nm3_mamba_prefill(
        t, proj.data_ptr(), proj.stride(0), conv_state.data_ptr(), ssm_state.data_ptr(), *static,
        mixer.chunk_size, dt_range[0], dt_range[1], mixer.norm.eps, out.data_ptr(), outs, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("nm3_mamba_prefill: scratch allocation failed")
    return out


def decode_attention(
    q: torch.Tensor, k_plane: torch.Tensor, v_plane: torch.Tensor, tables: torch.Tensor, table_offsets: torch.Tensor,
    lengths: torch.Tensor, block_size: int,
) -> torch.Tensor | None:  # fmt: skip
    """One-query attention for n decoding sequences straight from the paged pool: [n, nq, d], or None.

    q: [n, nq, d] (any sequence stride); k_plane, v_plane: [nkv, tokens, d] (one layer's pool, contiguous);
    tables: int64, every sequence's block ids back to back, sequence s's starting at table_offsets[s]; lengths:
    [n] keys per sequence (the new token's K/V already written). Scale 1/√d, softmax in float32. The pool may be
    float32 or bfloat16 (a bf16 K/V cache, widened as it is read); q is float32.
    """
    lib = library()
    kv_bf16 = _weight_type(k_plane, v_plane)
    if (
        lib is None
        or kv_bf16 is None
        or not _usable(q)
        or not (k_plane.is_contiguous() and v_plane.is_contiguous())
    ):
        return None
    n, nq, d = q.shape
    if q.stride(2) != 1 or q.stride(1) != d:
        q = q.contiguous()
    nkv, tokens, _ = k_plane.shape
    out = torch.empty(n, nq, d, dtype=torch.float32)
    table_ptrs = table_offsets * tables.element_size() + tables.data_ptr()  # the kernel takes one pointer per sequence
    rc = lib.nm3_decode_attention(
        n, q.data_ptr(), q.stride(0), k_plane.data_ptr(), v_plane.data_ptr(), kv_bf16, tokens, table_ptrs.data_ptr(),
        lengths.data_ptr(), block_size, nq, nkv, d, d**-0.5, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("nm3_decode_attention: scratch allocation failed")
    return out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """Causal GQA attention of one sequence's prompt chunk: [1, nq, T_q, d] float32 (a view of a [T_q, nq, d]
    buffer, as `Attention.output` reads it), or None when the kernel cannot run.

    q: [1, nq, T_q, d], the chunk's queries at positions T_k − T_q … T_k − 1, heads d apart (the rows of the qkv
    projection, read in place); k, v: [nkv, T_k, d] float32 with unit row stride (the cache's K/V of the whole
    sequence so far, this chunk's included). Scale 1/√d, softmax in float32, the math of `causal_attention`.
    """
    lib = library()
    if lib is None or q.dim() != 4 or q.shape[0] != 1 or k.dim() != 3 or k.shape != v.shape:
        return None
    _, nq, Tq, d = q.shape
    nkv, Tk, dk = k.shape
    if not (_usable(q, k, v) and dk == d and nq % nkv == 0 and 0 < Tq <= Tk and d > 0):
        return None
    if q.stride(3) != 1 or q.stride(1) != d or k.stride(2) != 1 or k.stride(1) != d or v.stride() != k.stride():
        return None
    out = torch.empty(Tq, nq, d, dtype=torch.float32)
    rc = lib.nm3_prefill_attention(
        Tq, Tk, q.data_ptr(), q.stride(2), k.data_ptr(), v.data_ptr(), k.stride(0), nq, nkv, d, d**-0.5,
        out.data_ptr(), nq * d, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("nm3_prefill_attention: scratch allocation failed")
    return out.transpose(0, 1)[None]


def add_rms_norm(
    hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor | None:
    """hidden += delta in place, then RMSNorm(hidden) with `weight`: the residual add and the next block's
    norm as one call (delta None: the norm alone). hidden, delta: [..., H] float32 contiguous. Returns the normed
    tensor, or None (nothing was changed) when the kernel cannot run."""
    lib = library()
    tensors = (hidden, weight) if delta is None else (hidden, delta, weight)
    if (
        lib is None
        or not _usable(*tensors)
        or not all(t.is_contiguous() for t in tensors)
        or (delta is not None and hidden.shape != delta.shape)
    ):
        return None
    H = hidden.shape[-1]
    out = torch.empty_like(hidden)
    lib.nm3_add_rms_norm(
        hidden.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(), eps, hidden.numel() // H,
        H, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def relu2_into(src: torch.Tensor, dst: torch.Tensor) -> bool:
    """dst = relu(src)² (model/mlp.py: relu2) in one pass, for [rows, cols] float32 views with unit column
    stride (any row strides: a fused projection's column slice into another buffer's). Returns False (dst
    untouched) when the kernel cannot run."""
    lib = library()
    if (
        lib is None
        or not _usable(src, dst)
        or src.dim() != 2
        or src.shape != dst.shape
        or src.stride(1) != 1
        or dst.stride(1) != 1
    ):
        return False
    rows, cols = src.shape
    threads = torch.get_num_threads()
    lib.nm3_relu2_rows(src.data_ptr(), src.stride(0), dst.data_ptr(), dst.stride(0), rows, cols, threads)
    return True


def _linear_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> int | None:
    """The kernels' w_bf16 flag for F.linear(x, weight, bias) when the native products can read the operands:
    CPU tensors, x [..., K] float32 with unit stride in K (K > 0), weight [N, K] float32 or bfloat16 (its layout
    is the caller's to check), bias float32 contiguous or None, and no autograd recording through them. Else
    None."""
    w_bf16 = _WEIGHT_FLAG.get(weight.dtype)
    if w_bf16 is None or x.dtype is not torch.float32 or weight.dim() != 2 or x.dim() < 1:
        return None
    K = weight.shape[1]
    if x.shape[-1] != K or x.stride(-1) != 1 or not K or not (x.is_cpu and weight.is_cpu):
        return None
    if bias is not None and (bias.dtype is not torch.float32 or not bias.is_cpu or not bias.is_contiguous()):
        return None
    operands = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in operands):
        return None
    return w_bf16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """F.linear(x, weight, bias) for at most LINEAR_MAX_ROWS rows, streaming the weight once: [..., N] float32,
    or None when the kernel cannot run.

    weight [N, K] must be the transposed view of a K-major storage (stride (1, ldw), ldw ≥ N), which is how
    the engine stores every Linear on CPU (engine/runner.py, transpose_linear_storage; fused matrices and
    their column slices alike), float32 or bfloat16. x: [..., K] float32 with unit stride in K; bias: [N] float32
    contiguous or None.
    """
    lib = _lib if _tried else library()
    w_bf16 = None if lib is None else _linear_operands(x, weight, bias)
    if w_bf16 is None:
        return None
    N, K = weight.shape
    shape = x.shape
    if weight.stride(0) != 1 or weight.stride(1) < N:
        return None
    rows = x.numel() // K
    if rows == 0 or rows > LINEAR_MAX_ROWS:
        return None
    if x.dim() == 2 or (x.dim() == 3 and shape[0] == 1):  # [T, K] / [1, T, K]: rows are stride(-2) apart
        ldx = x.stride(-2)
    else:
        x = x.reshape(rows, K)
        ldx = x.stride(0)
    out = torch.empty(*shape[:-1], N, dtype=torch.float32)
    rc = lib.nm3_linear(
        x.data_ptr(), rows, ldx, weight.data_ptr(), w_bf16, K, N, weight.stride(1),
        None if bias is None else bias.data_ptr(), out.data_ptr(), N, LINEAR_KSPLIT_BYTES, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("nm3_linear: allocation failed")
    return out


# torch.set_float32_matmul_precision's names → bf16 product terms of cpu_amx.c ("highest" stays float32)
MATMUL_PRODUCTS = {"high": 3, "medium": 1}
# Rows from which `matmul_bf16` runs: its packing reads and writes the whole weight once per call, which a GEMM
# of fewer rows does not repay (break-even measured at 64-192 rows by shape). A row-major weight's pack also
# transposes: the routed experts' products (128-270 rows per expert in a nemo300 prefill) ran at 0.7-1.0x MKL
# in the engine, so those need 4x the rows.
AMX_MIN_ROWS = 128
AMX_MIN_ROWS_ROW_MAJOR = 512
# Precisions `matmul_bf16` takes on CPUs without AMX (AVX512-BF16 dot products at twice the FMA's multiply-adds):
# "high"'s three bf16 products would take longer than MKL's one float32 product, so it stays float32 there.
# (Measured on a Zen 4 VM, 2 threads, against MKL's float32 GEMM: "medium" 2.0-2.9x from 32 rows on K-major
# weights, 1.2-1.3x at 64 rows and 1.5x at 128 on row-major ones, whose pack transposes; "high" 0.8-0.95x.)
DOT_PRECISIONS = ("medium",)
DOT_MIN_ROWS = 64


def amx_available() -> bool:
    """Whether this build and CPU run the AMX matrix products (and Linux granted the tile state)."""
    lib = library()
    return lib is not None and lib.nm3_amx_init() == 1


def bf16_dot_available() -> bool:
    """Whether this build runs `matmul_bf16` without AMX, on AVX512-BF16 dot products (AMD Zen 4, Cooper Lake)."""
    lib = library()
    return lib is not None and lib.nm3_bf16_dot_available() == 1


def allow_amx(on: bool) -> None:
    """Let `matmul_bf16` use AMX where it runs (the default), or not: then the AVX512-BF16 products (tests)."""
    global _amx_allowed
    lib = library()
    if lib is not None:
        lib.nm3_bf16_allow_amx(int(on))
    _amx_allowed = on


def bf16_matmul_kind() -> str | None:
    """Which products `matmul_bf16` runs here: "amx", "avx512_bf16" (only "medium": see matmul_bf16), or None."""
    return "amx" if _amx_allowed and amx_available() else "avx512_bf16" if bf16_dot_available() else None


def bf16_precisions() -> tuple[str, ...]:
    """The reduced precisions `matmul_bf16` runs here (the others stay float32): both on AMX, DOT_PRECISIONS on
    AVX512-BF16 alone, none without either."""
    kind = bf16_matmul_kind()
    return tuple(MATMUL_PRODUCTS) if kind == "amx" else DOT_PRECISIONS if kind else ()


def matmul_bf16(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, precision: str, out: torch.Tensor | None = None
) -> torch.Tensor | None:
    """F.linear(x, weight, bias) on AMX tiles under a reduced float32 matmul precision ("high": three bf16
    products, ~1e-5 relative; "medium": one) for at least AMX_MIN_ROWS rows, or None when it does not apply.
    Without AMX, the precisions of DOT_PRECISIONS run on AVX512-BF16 dot products where the CPU has them.
    weight [N, K] float32 or bfloat16, K-major (the engine's Linear storage) or row-major (nn.Linear's, the
    stacked experts'); x [..., K] float32 with unit stride in K. out: a contiguous float32 [..., N] to write
    (benchmarks time the product without the allocation), else a new tensor."""
    products = MATMUL_PRODUCTS.get(precision)
    lib = _lib if _tried else library()
    w_bf16 = None if products is None or lib is None else _linear_operands(x, weight, bias)
    if w_bf16 is None:
        return None
    N, K = weight.shape
    if weight.stride(0) == 1 and weight.stride(1) >= N:
        w_rows, ldw = 0, weight.stride(1)
    elif weight.stride(1) == 1 and weight.stride(0) >= K:
        w_rows, ldw = 1, weight.stride(0)
    else:
        return None
    rows = x.numel() // K
    kind = bf16_matmul_kind()
    if kind == "amx":
        min_rows = AMX_MIN_ROWS_ROW_MAJOR if w_rows else AMX_MIN_ROWS
    elif kind == "avx512_bf16" and precision in DOT_PRECISIONS:
        min_rows = DOT_MIN_ROWS
    else:
        return None
    if rows < min_rows:
        return None
    shape = (*x.shape[:-1], N)
    x2 = x if x.dim() == 2 else x.reshape(rows, K)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    elif out.shape != shape or out.dtype is not torch.float32 or not out.is_contiguous() or not out.is_cpu:
        raise ValueError(f"out must be a contiguous float32 CPU tensor of shape {tuple(shape)}")
    rc = lib.nm3_matmul_bf16(
        x2.data_ptr(), rows, x2.stride(0), K, weight.data_ptr(), w_bf16, w_rows, N, ldw,
        None if bias is None else bias.data_ptr(), out.data_ptr(), N, products, torch.get_num_threads(),
    )  # fmt: skip
    if rc == -2:
        raise MemoryError("nm3_matmul_bf16: allocation failed")
    return out if rc == 0 else None


def ssd_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int,
    state: torch.Tensor,
) -> torch.Tensor | None:  # fmt: skip
    """mamba2.ssd_chunk_scan for one sequence, advancing `state` in place: y [1, t, h, p] float32, or None.

    x [1, t, h, p], dt [1, t, h], B and C [1, t, g, n] (views with dense trailing dims are read in place, others
    copied once: the conv output is channel-major); A [h]; state [1, h, p, n] contiguous float32 (the entering
    state; it receives the final one). No packed segments.
    """
    lib = library()
    if lib is None or x.dim() != 4 or x.shape[0] != 1 or not _usable(x, dt, A, B, C, state):
        return None
    _, t, h, p = x.shape
    g, n = B.shape[-2:]
    if not (state.is_contiguous() and h % g == 0):
        return None

    def rows(v: torch.Tensor) -> torch.Tensor:  # dense trailing dims, any token stride (else one copy)
        return v if v.stride(-1) == 1 and (v.dim() < 4 or v.stride(-2) == v.shape[-1]) else v.contiguous()

    x, dt, B, C, A = rows(x), rows(dt), rows(B), rows(C), A.contiguous()
    y = torch.empty(1, t, h, p, dtype=torch.float32)
    rc = lib.nm3_ssd_scan(
        t, h, p, g, n, chunk_size, x.data_ptr(), x.stride(1), dt.data_ptr(), dt.stride(1), A.data_ptr(),
        B.data_ptr(), B.stride(1), C.data_ptr(), C.stride(1), state.data_ptr(), y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("nm3_ssd_scan: scratch allocation failed")
    return y
