"""Smoke version of benchmarks/bench_serve.py: two small concurrency levels against the default model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serve_benchmark_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "benchmarks" / "bench_serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "serve"
    result = bench.main(["--concurrency", "1", "4", "--max-tokens", "4", "--rounds", "1", "--out", str(out)])
    assert [x["concurrency"] for x in result["levels"]] == [1, 4]
    for level in result["levels"]:
        assert level["tokens"] == 4 * level["concurrency"] and level["tokens_per_s"] > 0
        assert 0 < level["ttft_median_s"] <= level["ttft_p90_s"]
    assert json.loads(out.with_suffix(".json").read_text())["levels"]
    assert out.with_suffix(".png").stat().st_size > 1000
