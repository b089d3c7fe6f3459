"""The engine's native CPU kernels against this machine's ceilings: what each reaches, and how far the bound is.

    python benchmarks/bench_kernels.py              # the layer shapes of nemo50 / nemo300 (research/perf.md §2), ~30 s
    python benchmarks/bench_kernels.py --smoke      # tiny shapes, seconds (tests/test_bench.py runs it)

One process, 2 torch threads, fp32 math. Every case is timed `--reps` times, the cases interleaved rep by rep,
and the median is reported:

    ceilings   read bandwidth: torch.sum over a tensor twice the L3 (DRAM) with 1 and 2 threads, and over a
               48 MiB one read after WARM_CALLS untimed reads (mostly L3); MKL's fp32 GEMM at the Mamba in_proj
               shape of a 2048-token prefill, and oneDNN's (kernels/onednn.py: what the engine's prefill
               projections run, its output allocated per call)
    decode     nm3_linear at batch 1 over an lm_head-sized matrix (nemo300: 1024 × 32000, fp32 and bf16);
               nm3_decode_attention over 32k keys of one nemo50 attention layer (8 query / 2 KV heads × 64), fp32
               and bf16 K/V, with the K/V in cache (hot: after WARM_CALLS calls) and after reading twice the L3
               (cold, as inside a decode step, where the weights stream through the L3 between two reads)
    prefill    nm3_ssd_scan of a nemo50 / nemo300 Mamba layer at 2048 tokens (the FLOPs of its GEMMs: C·Bᵀ per
               chunk and group; entering state, intra-chunk mix and state update per chunk and head);
               causal GQA attention of a nemo50 / nemo300 layer at 2048 tokens, and of the 4th 2048-token chunk of
               an 8192-token nemo50 prompt: torch's `sdpa` (a boolean mask for the chunk) and nm3_prefill_attention
    bf16       (CPUs with AMX or AVX512-BF16) at the GEMM shapes: torch's bfloat16 `mm` (oneDNN: the bf16 ceiling)
               and nm3_matmul_bf16 under matmul_precision "high" (three bf16 products, AMX only) and "medium"
               (one), packing included, over the engine's K-major weight; FLOPs counted as one float32 GEMM's

Writes benchmarks/results/kernels.json and kernels.png (matplotlib, from `pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import common

from nemotron3.kernels import native, onednn

MIB = 1 << 20
WARM_CALLS = 4  # untimed calls before a "hot" one: this L3 keeps data read once at low priority (a read after
# evicting takes ~2 ms for 33.5 MB of K/V, the 2nd ~2 ms too, the 4th ~1.1 ms), so one warm-up is not enough


@dataclass(frozen=True)
class Shapes:
    """The sizes one run measures (full run, or the smoke test's tiny stand-ins)."""

    dram_mib: int  # the "DRAM" read tensor (twice the L3 in a full run)
    l3_mib: int  # the tensor read again and again
    evict_mib: int  # read before every cold measurement
    gemm: tuple[tuple[str, int, int, int], ...]  # (name, M, K, N)
    gemv: tuple[int, int]  # (K, N)
    attn_keys: int
    scan: tuple[tuple[str, int, int, int, int, int], ...]  # (name, tokens, heads, head_dim, groups, state)
    sdpa: tuple[tuple[str, int, int, int, int], ...]  # (name, queries, keys, query heads, KV heads); head_dim 64


def l3_bytes() -> int:
    """The last-level cache size from sysfs (64 MiB if unknown)."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        unit = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        return int(text.rstrip("KM")) * unit
    except (OSError, ValueError):
        return 64 * MIB


def full_shapes() -> Shapes:
    big = max(512, 2 * l3_bytes() // MIB)
    return Shapes(
        dram_mib=big, l3_mib=48, evict_mib=big,
        gemm=(("nemo50 Mamba in_proj", 2048, 512, 2320), ("nemo300 Mamba in_proj", 2048, 1024, 5152)),
        gemv=(1024, 32000), attn_keys=32768,
        scan=(("nemo50", 2048, 16, 64, 2, 64), ("nemo300", 2048, 32, 64, 4, 128)),
        sdpa=(("nemo50", 2048, 2048, 8, 2), ("nemo300", 2048, 2048, 16, 4), ("nemo50 chunk 4", 2048, 8192, 8, 2)),
    )  # fmt: skip


SMOKE = Shapes(
    dram_mib=8, l3_mib=2, evict_mib=8, gemm=(("tiny", 256, 32, 48),), gemv=(64, 500), attn_keys=300,
    scan=(("tiny", 200, 4, 16, 2, 16),), sdpa=(("tiny", 64, 64, 4, 2), ("tiny chunk", 40, 100, 4, 2)),
)  # fmt: skip


class Bench:
    """Named cases timed round-robin (each rep times every case once), so all see the same machine phases."""

    def __init__(self) -> None:
        self.cases: dict[str, tuple[Callable[[], object], Callable[[], object] | None]] = {}
        self.times: dict[str, list[float]] = {}
        self.sizes: dict[str, dict] = {}  # per case: bytes read or flops, and the shape, for the rates

    def add(self, name: str, fn: Callable[[], object], before: Callable[[], object] | None = None, **size) -> None:
        """fn is timed; before (untimed) runs first each time, e.g. to evict the cache; size: bytes= or flops=
        (and shape=) of one call."""
        self.cases[name] = (fn, before)
        self.times[name] = []
        self.sizes[name] = size

    def run(self, reps: int, warmup: int = 1) -> None:
        for r in range(warmup + reps):
            for name, (fn, before) in self.cases.items():
                if before is not None:
                    before()
                t0 = time.perf_counter()
                fn()
                if r >= warmup:
                    self.times[name].append(time.perf_counter() - t0)

    def median_s(self, name: str) -> float:
        return statistics.median(self.times[name])


def repeat(fn: Callable[[], object], times: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(times):
            fn()

    return run


def with_threads(n: int, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return run


def scan_flops(t: int, h: int, p: int, g: int, n: int, Q: int = 128) -> float:
    """FLOPs of nm3_ssd_scan's products: per chunk (q tokens) and group C·Bᵀ on and below the diagonal
    (q(q+1)/2·n); per chunk and head the entering state (q·n·p), the intra-chunk mix (q(q+1)/2·p) and the state
    update (n·q·p). 2 FLOPs per multiply-add."""
    macs = 0
    for c0 in range(0, t, Q):
        q = min(Q, t - c0)
        tri = q * (q + 1) // 2
        macs += g * tri * n + h * (q * n * p + tri * p + n * q * p)
    return 2.0 * macs


def causal_attention_flops(t: int, nq: int, d: int, before: int = 0) -> float:
    """Q·Kᵀ and P·V over the causal (query, key) pairs of every query head: query i of t sees the `before`
    earlier keys and keys 0 … i of its own chunk, t(t+1)/2 + t·before pairs."""
    return 2.0 * 2 * nq * (t * (t + 1) // 2 + t * before) * d


def add_ceilings(bench: Bench, s: Shapes) -> None:
    dram = torch.ones(s.dram_mib * MIB // 4)
    l3 = torch.ones(s.l3_mib * MIB // 4)
    for threads in (1, 2):
        name = f"read DRAM, {threads} thread{'s' * (threads > 1)}"
        bench.add(name, with_threads(threads, dram.sum), bytes=dram.numel() * 4)
    bench.add("read L3-sized, 2 threads", l3.sum, before=repeat(l3.sum, WARM_CALLS), bytes=l3.numel() * 4)
    for name, m, k, n in s.gemm:
        a, w = torch.randn(m, k), torch.randn(k, n)
        out = torch.empty(m, n)
        bench.add(f"MKL GEMM {name}", lambda a=a, w=w, out=out: torch.mm(a, w, out=out), flops=2.0 * m * k * n,
                  shape=[m, k, n])  # fmt: skip
        if onednn.available() and m >= onednn.MIN_ROWS:  # the engine's prefill projections (output allocated)
            wk = w.t()  # [n, k] over the contiguous [k, n]: the engine's K-major Linear storage
            assert onednn.linear(a, wk) is not None
            bench.add(f"oneDNN GEMM {name}", lambda a=a, w=wk: onednn.linear(a, w), flops=2.0 * m * k * n,
                      shape=[m, k, n])  # fmt: skip


def add_bf16(bench: Bench, s: Shapes) -> None:
    """The bf16 product rows: both precisions on AMX, "medium" on AVX512-BF16 dot products (DOT_PRECISIONS)
    without it, none where the CPU, compiler or kernel has neither."""
    kind, precisions = native.bf16_matmul_kind(), native.bf16_precisions()
    if not precisions:
        return
    for name, m, k, n in s.gemm:
        a, w = torch.randn(m, k), torch.randn(n, k).t().contiguous().t()  # the engine's K-major storage
        a16, w16 = a.bfloat16(), torch.randn(k, n).bfloat16()
        size = {"flops": 2.0 * m * k * n, "shape": [m, k, n]}
        bench.add(f"torch bf16 mm {name}", lambda a=a16, w=w16: torch.mm(a, w), **size)
        out = torch.empty(m, n)  # as the MKL row: the product, not a fresh 42 MB output's page faults
        for precision in precisions:
            product = lambda a=a, w=w, p=precision, out=out: native.matmul_bf16(a, w, None, p, out=out)  # noqa: E731
            bench.add(f"nm3_matmul_bf16 {precision} ({kind}) {name}", product, **size)


def add_decode(bench: Bench, s: Shapes, evict: Callable[[], object]) -> None:
    K, N = s.gemv
    x = torch.randn(1, K)
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(K, N).to(dtype).t()  # the K-major storage the engine gives every Linear
        tag = "fp32" if dtype is torch.float32 else "bf16"
        bench.add(f"nm3_linear b1 {tag}, cold", lambda w=w: native.linear(x, w), before=evict,
                  bytes=K * N * w.element_size(), shape=[K, N])  # fmt: skip
    nq, nkv, d, bs, L = 8, 2, 64, 16, s.attn_keys
    tokens = -(-L // bs) * bs
    q = torch.randn(1, nq, d)
    tables, offsets, lengths = torch.arange(tokens // bs), torch.tensor([0]), torch.tensor([L])
    for dtype in (torch.float32, torch.bfloat16):
        k = torch.randn(nkv, tokens, d).to(dtype)
        v = torch.randn(nkv, tokens, d).to(dtype)
        tag = "fp32" if dtype is torch.float32 else "bf16"

        def attend(k=k, v=v):
            return native.decode_attention(q, k, v, tables, offsets, lengths, bs)

        for where, before in (("hot", repeat(attend, WARM_CALLS)), ("cold", evict)):
            name = f"nm3_decode_attention {L} keys, {tag} K/V, {where}"
            bench.add(name, attend, before=before, bytes=2 * nkv * L * d * k.element_size())


def add_prefill(bench: Bench, s: Shapes) -> None:
    for name, t, h, p, g, n in s.scan:
        x, dt = torch.randn(1, t, h, p), torch.rand(1, t, h) * 0.1
        A, B, C = -torch.rand(h) - 0.5, torch.randn(1, t, g, n), torch.randn(1, t, g, n)
        state = torch.randn(1, h, p, n)
        bench.add(f"nm3_ssd_scan {name}", lambda x=x, dt=dt, A=A, B=B, C=C, st=state: native.ssd_scan(
            x, dt, A, B, C, 128, st.clone()), flops=scan_flops(t, h, p, g, n), shape=[t, h, p, g, n])  # fmt: skip
    for name, tq, tk, nq, nkv in s.sdpa:
        q = torch.randn(1, tq, nq, 64).transpose(1, 2)  # heads adjacent in a token row, as the qkv projection gives
        k, v = torch.randn(nkv, tk, 64), torch.randn(nkv, tk, 64)
        mask = None if tq == tk else torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)
        size = {"flops": causal_attention_flops(tq, nq, 64, tk - tq), "shape": [tq, tk, nq, nkv, 64]}
        bench.add(f"sdpa causal {name}", lambda q=q, k=k, v=v, m=mask: F.scaled_dot_product_attention(
            q, k[None], v[None], attn_mask=m, is_causal=m is None, enable_gqa=True), **size)  # fmt: skip
        bench.add(f"nm3_prefill_attention {name}", lambda q=q, k=k, v=v: native.prefill_attention(q, k, v), **size)


def summarize(bench: Bench) -> dict:
    rows = {}
    for name in bench.cases:
        med = bench.median_s(name)
        row = {"median_ms": med * 1e3, "ms": [t * 1e3 for t in bench.times[name]], **bench.sizes[name]}
        if "bytes" in row:
            row["gb_per_s"] = row["bytes"] / med / 1e9
        if "flops" in row:
            row["gflop_per_s"] = row["flops"] / med / 1e9
        rows[name] = row
    dram = rows.get("read DRAM, 2 threads", {}).get("gb_per_s")
    gemm = [r["gflop_per_s"] for n, r in rows.items() if n.startswith("MKL GEMM")]
    for name, row in rows.items():
        if dram and "gb_per_s" in row and not name.startswith("read"):
            row["fraction_of_dram_read"] = row["gb_per_s"] / dram
        if gemm and "gflop_per_s" in row and not name.startswith("MKL"):
            row["fraction_of_mkl_gemm"] = row["gflop_per_s"] / max(gemm)
    return rows


def plot(rows: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, key, label in ((left, "gb_per_s", "GB/s read"), (right, "gflop_per_s", "GFLOP/s")):
        names = [n for n, r in rows.items() if key in r]
        values = [rows[n][key] for n in names]
        colors = ["0.6" if n.startswith(("read", "MKL")) else "tab:blue" for n in names]
        ax.barh(range(len(names)), values, color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    left.set_title("bandwidth: the ceilings (grey) and the decode kernels")
    right.set_title("compute: MKL's GEMM (grey) and the prefill kernels")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1 rep (for tests)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per case (default 15; smoke 1)")
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="results directory")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if not native.available():
        print("the native kernels are not available here (no C compiler, or NEMOTRON3_NATIVE=0)", file=sys.stderr)
        return 1
    torch.set_num_threads(common.THREADS)
    shapes = SMOKE if args.smoke else full_shapes()
    reps = args.reps or (1 if args.smoke else 15)
    evict_buf = torch.ones(shapes.evict_mib * MIB // 4)
    bench = Bench()
    with torch.inference_mode():
        add_ceilings(bench, shapes)
        add_decode(bench, shapes, evict_buf.sum)
        add_prefill(bench, shapes)
        add_bf16(bench, shapes)
        t0 = time.perf_counter()
        bench.run(reps)
    rows = summarize(bench)
    data = {
        "benchmark": "bench_kernels", "mode": "smoke" if args.smoke else "full",
        "date": time.strftime("%Y-%m-%d %H:%M"), "reps": reps, "total_s": time.perf_counter() - t0,
        "machine": {**common.machine_info(), "l3_bytes": l3_bytes()}, "shapes": asdict(shapes), "results": rows,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_plot and (png := plot(rows, args.out / "kernels.png")):
        data["png"] = png.name
    common.write_json(args.out / "kernels.json", data)
    for name, r in rows.items():
        rate = f"{r['gb_per_s']:7.1f} GB/s" if "gb_per_s" in r else f"{r.get('gflop_per_s', 0):7.1f} GFLOP/s"
        print(f"{name:48s} {r['median_ms']:9.3f} ms  {rate}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
