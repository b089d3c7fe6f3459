"""Smoke tests of the benchmarks: `nemotron3 bench` on the tiny preset, bench_engine.py and bench_kernels.py --smoke.

Timings are not checked (the CI machine is noisy, research/perf.md §6); only that every measurement is
produced and lands in the output with the documented fields.
"""

import json
from pathlib import Path

import pytest

from nemotron3.cli import main
from nemotron3.kernels import native
from tests.benchmarks.helpers import benchmark_module

ROOT = Path(__file__).resolve().parents[1]


def test_cli_bench_tiny_json(capsys):
    rc = main(
        ["bench", "tiny", "--batch", "1", "3", "--prompt-len", "24", "--max-tokens", "6", "--reps", "1", "--json"]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "tiny" and out["pattern"] == "MEM*E-"
    pre = out["prefill"]
    assert pre["prompt_len"] == 24 and len(pre["times_s"]) == 1 and pre["tok_s"] > 0
    assert [d["batch"] for d in out["decode"]] == [1, 3]
    for d in out["decode"]:
        assert d["decode_tok_s"] > 0 and d["median_ms_per_step"] > 0 and d["e2e_tok_s"] > 0
        assert d["full_batch_steps"] >= 1  # every sequence decoded together at least once
        assert sum(d["step_decodes"]) == d["batch"] * (d["max_tokens"] - 1)  # first token comes from the prefill
        assert sum(d["step_prefill_tokens"]) == d["batch"] * 24


def test_cli_bench_table_and_errors(capsys):
    assert main(["bench", "tiny", "--batch", "2", "--prompt-len", "8", "--max-tokens", "3", "--reps", "1"]) == 0
    text = capsys.readouterr().out
    assert "prefill (batch 1)" in text and "decode tok/s" in text
    assert main(["bench", "tiny", "--batch", "0"]) == 2
    assert "--batch must be >= 1" in capsys.readouterr().err
    assert main(["bench", "tiny", "--batch", "1", "--prompt-len", "8", "--max-tokens", "3", "--reps", "1",
                 "--weight-dtype", "bfloat16", "--kv-cache-dtype", "bfloat16"]) == 0  # fmt: skip
    assert "(bf16 matrices), K/V bfloat16" in capsys.readouterr().out
    assert main(["bench", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def bench_engine():
    yield from benchmark_module("bench_engine")


@pytest.fixture(scope="module")
def bench_kernels():
    yield from benchmark_module("bench_kernels")


def test_bench_engine_smoke(bench_engine, tmp_path, capsys):
    pytest.importorskip("transformers")
    assert bench_engine.main(["--smoke", "--out", str(tmp_path), "--no-plot"]) == 0
    data = json.loads((tmp_path / "engine.json").read_text())
    for key in ("machine", "configs", "plan", "results", "raw", "targets", "contention", "total_s"):
        assert key in data, key
    assert data["machine"]["torch"] and data["machine"]["transformers"] == "5.23.0"
    assert {"tiny50", "tiny300", "tiny50-attn"} <= set(data["configs"])
    assert not [r["error"] for r in data["raw"] if "error" in r]
    assert all(r["peak_rss_mib"] > 0 for r in data["raw"])
    res = data["results"]
    for m in ("tiny50", "tiny300"):
        d = res["decode_b1"][m]
        assert d["ours"]["median"] > 0 and d["hf"]["median"] > 0 and d["speedup_vs_hf"] > 0
        assert 0 < d["ours_roofline_fraction"] and d["bytes_per_step"]["total"] > 0
        assert d["greedy_tokens_identical"]  # same weights, same greedy tokens in both engines
        w = d["ours_bf16_weights"]  # weight-only bf16 reads fewer bytes per step than fp32
        assert w["median"] > 0 and w["bytes_per_step"]["total"] < d["bytes_per_step"]["total"]
        assert w["speedup_vs_hf_fp32"] == pytest.approx(w["median"] / d["hf"]["median"])
        e = d["ours_eager"]  # every step per op (enforce_eager) beside the decode program
        assert e["median"] > 0 and e["program_speedup"] == pytest.approx(d["ours"]["median"] / e["median"])
        assert set(res["concurrency"][m]["ours"]) == {"1", "2", "4"}
        assert all(c["median"] > 0 for c in res["concurrency"][m]["ours"].values())
        assert res["concurrency"][m]["hf_batch8"]["median"] > 0
        for L in ("32", "64"):
            assert res["prefill"][m][L]["speedup_vs_hf"] > 0
            arms = {k for k in res["prefill"][m][L] if k.startswith("ours_matmul_")}
            kind = native.bf16_matmul_kind()  # AMX: both reduced precisions; AVX512-BF16 alone: "medium"
            expected = {"amx": {"high", "medium"}, "avx512_bf16": set(native.DOT_PRECISIONS), None: set()}[kind]
            assert arms == {f"ours_matmul_{p}" for p in expected}
    for run in data["raw"]:  # the arm's engine really ran under the precision it is reported for
        if run["spec"].get("matmul_precision"):
            assert run["engine_options"]["matmul_precision"] == run["spec"]["matmul_precision"]
        if run["spec"]["scenario"] == "prefill":  # the plan's timed calls, after the warm-up
            assert len(run["times_s"]) == run["spec"]["calls"] == 2
        prof = res["profile"][m]
        assert prof["top_ops"] and prof["aten_calls_per_step"] > 0
        assert prof["components_ms_per_step"]["engine_step"] > 0
        assert prof["components_ms_per_step"]["engine_step_program"] > 0  # the program ran, then the per-op path
        assert prof["aten_calls_per_step_program"] < prof["aten_calls_per_step"]
    for m in ("tiny50", "tiny50-attn"):
        for L in ("32", "128"):
            row = res["context"][m][L]
            assert row["ours"]["median_ms"] > 0 and row["hf"]["median_ms"] > 0 and row["ours_growth_vs_first"] > 0
        for key in ("context_pair", "context_pair_kv_bf16"):
            pair = res[key][m]
            assert pair["base"] == 32 and pair["prompt"] == 128 and pair["steps_each"] == 48
            assert pair["growth"] == pytest.approx(pair["long_ms"] / pair["base_ms"])
    assert len(data["targets"]) == 6
    assert all(t["measured"] is not None and t["met"] in (True, False) for t in data["targets"])
    assert "| target | measured | met |" in capsys.readouterr().out


def test_bench_kernels_smoke(bench_kernels, tmp_path):
    from nemotron3.kernels import native

    if not native.available():
        pytest.skip("no native kernels here")
    assert bench_kernels.main(["--smoke", "--out", str(tmp_path), "--no-plot"]) == 0
    data = json.loads((tmp_path / "kernels.json").read_text())
    rows = data["results"]
    assert data["mode"] == "smoke" and data["reps"] == 1 and data["machine"]["torch"]
    for name in ("read DRAM, 2 threads", "nm3_linear b1 fp32, cold", "nm3_linear b1 bf16, cold"):
        assert rows[name]["gb_per_s"] > 0, name
    for kv in ("fp32", "bf16"):
        for where in ("hot", "cold"):
            row = rows[f"nm3_decode_attention 300 keys, {kv} K/V, {where}"]
            assert row["bytes"] == 2 * 2 * 300 * 64 * (4 if kv == "fp32" else 2) and row["fraction_of_dram_read"] > 0
    assert rows["nm3_ssd_scan tiny"]["gflop_per_s"] > 0 and rows["sdpa causal tiny"]["fraction_of_mkl_gemm"] > 0
    assert rows["nm3_prefill_attention tiny chunk"]["flops"] == rows["sdpa causal tiny chunk"]["flops"] > 0
    assert rows["MKL GEMM tiny"]["flops"] == 2.0 * 256 * 32 * 48
    kind = native.bf16_matmul_kind()
    if kind is not None:
        assert rows[f"nm3_matmul_bf16 medium ({kind}) tiny"]["fraction_of_mkl_gemm"] > 0


def test_scan_flop_count_matches_a_direct_count(bench_kernels):
    """scan_flops against counting every multiply-add of the chunked products one by one (a short last chunk
    included); causal attention counts the t(t+1)/2 visible pairs."""
    t, h, p, g, n, Q = 300, 4, 8, 2, 16, 128
    macs = 0
    for c0 in range(0, t, Q):
        q = min(Q, t - c0)
        pairs = sum(1 for l in range(q) for j in range(l + 1))
        macs += g * pairs * n  # C_l · B_j, j <= l
        macs += h * (q * n * p + pairs * p + n * q * p)
    assert bench_kernels.scan_flops(t, h, p, g, n, Q) == 2 * macs
    assert bench_kernels.causal_attention_flops(3, 2, 4) == 2 * 2 * 2 * 6 * 4
    assert bench_kernels.causal_attention_flops(3, 2, 4, before=5) == 2 * 2 * 2 * (6 + 15) * 4


@pytest.mark.parametrize("kv_dtype", ["auto", "bfloat16"])
def test_make_llm_pools_hold_the_run(kv_dtype):
    """make_llm sizes the pools for n_seqs × tokens_per_seq whatever the K/V dtype: a bf16 cache halves only the
    K/V blocks (the conv windows stay in the activations' dtype), so the engine's max_model_len is not cut short."""
    from nemotron3.bench import build_model, make_llm

    _, model = build_model("tiny")
    llm, _ = make_llm(model, 2, 100, 64, {"kv_cache_dtype": kv_dtype})
    assert llm.engine.max_model_len >= 100
    assert llm.engine.cache.num_blocks >= 2 * (-(-100 // 16) + 2)  # cache_bytes: blocks of 16, 2 spare per sequence
