"""benchmarks/bench_parallel_sampling.py in its smoke form: the A/B runs, the counts and the files it writes."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.helpers import benchmark_module


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("bench_parallel_sampling")


def test_smoke_run_counts_one_prefill_per_prompt_and_writes_json_and_png(bench, tmp_path):
    out = tmp_path / "ps"
    result = bench.main(["--smoke", "--out", str(out)])
    (c,) = result["cells"]
    assert c["prompt_tokens_fed"] == {"forked": 2 * 24, "prefilled": 2 * 3 * 24}  # 2 prompts × n = 3, 24 tokens
    assert c["tokens_identical"] and c["generated_tokens"] == 2 * 3 * 4
    # 24 prompt + 3 written new tokens = 2 blocks of 16 per sample; forked, the full first block is shared:
    # 2 prompts × (1 + 3 own blocks) against 2 × 3 × 2
    assert c["peak_blocks_held"] == {"forked": 8, "prefilled": 12, "block_size": 16}
    assert c["speedup"] == pytest.approx(c["prefilled_s"] / c["forked_s"])
    assert json.loads(out.with_suffix(".json").read_text())["cells"][0]["n"] == 3
    assert out.with_suffix(".png").stat().st_size > 0
