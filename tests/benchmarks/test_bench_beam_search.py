"""benchmarks/bench_beam_search.py in its smoke form: the same beams as transformers, and the files it writes."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.helpers import benchmark_module


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("bench_beam_search")


def test_smoke_run_matches_transformers_and_writes_json_and_png(bench, tmp_path):
    out = tmp_path / "bs"
    result = bench.main(["--smoke", "--out", str(out)])
    assert [c["prompts"] for c in result["scenarios"]] == [1, 2]
    for cell in result["scenarios"]:
        assert cell["tokens_identical"]
        assert cell["speedup"] == pytest.approx(cell["transformers_s"] / cell["ours_s"])
        assert len(cell["times_s"]["ours"]) == len(cell["times_s"]["transformers"]) == 1
    assert json.loads(out.with_suffix(".json").read_text())["beams"] == 4
    assert out.with_suffix(".png").stat().st_size > 0
