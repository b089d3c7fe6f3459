"""benchmarks/bench_detokenize.py in its smoke form."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.helpers import benchmark_module


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("bench_detokenize")


def test_smoke_run_writes_both_timings_and_the_same_text(bench, tmp_path):
    out = tmp_path / "detok.json"
    (cell,) = bench.main(["--smoke", "--out", str(out)])["cells"]
    assert cell["tokens"] == 64 and cell["same_text"]
    assert cell["whole_total_s"] > 0 and cell["incremental_total_s"] > 0
    assert json.loads(out.read_text())["cells"][0]["speedup_total"] == pytest.approx(cell["speedup_total"])
