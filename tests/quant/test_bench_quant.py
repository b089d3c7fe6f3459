"""Smoke test of benchmarks/bench_quant.py (tiny sizes): every variant measured, the JSON fields present."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench_quant():
    threads, path = torch.get_num_threads(), list(sys.path)
    spec = importlib.util.spec_from_file_location("bench_quant", ROOT / "benchmarks" / "bench_quant.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    for name in ("bench_quant", "common"):
        sys.modules.pop(name, None)
    sys.path[:] = path
    torch.set_num_threads(threads)


@pytest.mark.filterwarnings("ignore:no tokenizer.json")
def test_bench_quant_smoke(bench_quant, tmp_path, capsys):
    assert bench_quant.main(["--smoke", "--out", str(tmp_path), "--no-plot"]) == 0
    data = json.loads((tmp_path / "quant_smoke.json").read_text())
    assert data["model"] == "tiny50" and data["quantize"]["quant_algo"] == "MIXED_PRECISION"
    assert set(data["variants"]) == {"fp32", "bf16", "w4a16-fp32", "w4a16-bf16"}
    for name, v in data["variants"].items():
        assert v["decode_tok_s"]["median"] > 0 and v["weight_mib"] > 0
        assert 0 <= data["quality"][name]["next_token_agreement_vs_fp32"] <= 1
    assert data["variants"]["w4a16-bf16"]["weight_mib"] < data["variants"]["bf16"]["weight_mib"]
    assert data["variants"]["w4a16-fp32"]["weight_mib_by_storage"]["nvfp4"] > 0
    assert data["quality"]["fp32"]["next_token_agreement_vs_fp32"] == 1.0
    assert "| w4a16-fp32 |" in capsys.readouterr().out
