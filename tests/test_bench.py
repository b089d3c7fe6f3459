"""Smoke tests of the benchmarks: `nemotron3 bench` on the tiny preset, and bench_engine.py --smoke.

Timings are not checked (the CI machine is noisy, research/perf.md §6); only that every measurement is
produced and lands in the output with the documented fields.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from nemotron3.cli import main

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
    """benchmarks/bench_engine.py as a module (it puts benchmarks/ on sys.path for its `common`)."""
    threads, path = torch.get_num_threads(), list(sys.path)
    spec = importlib.util.spec_from_file_location("bench_engine", ROOT / "benchmarks" / "bench_engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    for name in ("bench_engine", "common"):
        sys.modules.pop(name, None)
    sys.path[:] = path
    torch.set_num_threads(threads)


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
