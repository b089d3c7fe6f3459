"""benchmarks/bench_decode_batch.py in its smoke form: both paths give the same tokens, and the files it writes."""

from __future__ import annotations

import json

import pytest

from nemotron3.kernels import native
from tests.benchmarks.helpers import benchmark_module


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("bench_decode_batch")


def test_smoke_run_compares_the_two_row_limits_and_writes_json_and_png(bench, tmp_path):
    out = tmp_path / "db"
    result = bench.main(["--smoke", "--out", str(out)])
    assert [c["batch"] for c in result["cells"]] == [2, 12]
    for c in result["cells"]:
        assert c["tokens_identical"]
        assert c["speedup"] == pytest.approx(c["old_ms"] / c["now_ms"])
    assert native.LINEAR_MAX_ROWS == bench.NOW == 64  # put back after the run
    assert json.loads(out.with_suffix(".json").read_text())["cells"][1]["batch"] == 12
    assert out.with_suffix(".png").stat().st_size > 0
