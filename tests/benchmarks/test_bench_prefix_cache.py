"""benchmarks/bench_prefix_cache.py in its smoke form: both scenarios, the cached counts and the files it writes."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.helpers import benchmark_module


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("bench_prefix_cache")


def test_smoke_run_resumes_after_cached_prefixes_and_writes_json_and_png(bench, tmp_path):
    out = tmp_path / "pc"
    result = bench.main(["--smoke", "--out", str(out)])
    system, chat = result["system"], result["chat"]
    assert system["tokens_identical"] and chat["tokens_identical"]
    # 48-token system prompt + 8-token questions, blocks of 16: the first request's prompt snapshot (at 48) is the
    # system prompt's end, so the second request already resumes there
    assert [r["cached_tokens"] for r in system["requests"]] == [0, 48, 48]
    # chat: 48 + 4 answer tokens + 12 → 64 tokens; the first turn's decoding reached token 51: resumes at 48
    assert [r["prompt_tokens"] for r in chat["requests"]] == [48, 64, 80]
    assert [r["cached_tokens"] for r in chat["requests"]] == [0, 48, 64]
    assert system["steady_speedup"] > 0 and chat["wall_speedup"] == pytest.approx(chat["wall_off_s"] / chat["wall_on_s"])
    assert json.loads(out.with_suffix(".json").read_text())["chat"]["requests"][1]["cached_tokens"] == 48
    assert out.with_suffix(".png").stat().st_size > 0
