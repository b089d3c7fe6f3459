"""Smoke version of benchmarks/bench_ablations.py: every variant trains 2 steps on a tiny local corpus."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_ablations", ROOT / "benchmarks" / "bench_ablations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablation_benchmark_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _load_bench()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = "\f".join(f"ACT {i}. SCENE I.\nROMEO. " + "But soft, what light through yonder window breaks? " * 30
                     for i in range(6))  # fmt: skip
    (corpus / "train.txt").write_text(text)
    (corpus / "valid.txt").write_text(text[:4000])
    from nemotron3.train import prepare

    monkeypatch.setattr(bench, "build_corpus", lambda _: corpus)
    monkeypatch.setattr(prepare, "build_corpus", lambda _: corpus)
    out = tmp_path / "res"
    result = bench.main(["--steps", "2", "--seeds", "2", "--seq-len", "32", "--vocab-size", "300",
                         "--work", str(tmp_path / "work"), "--out", str(out), "--threads", "1"])  # fmt: skip
    assert len(result["runs"]) == 2 * len(bench.VARIANTS)
    assert [row["pair"] for row in result["summary"]] == [list(p) for p in bench.PAIRS]
    for row in result["summary"]:
        for name in row["pair"]:
            assert len(row[name]["seeds"]) == 2 and all(loss > 0 for loss in row[name]["seeds"])
    fpt = {r["variant"]: r["flops_per_token"] for r in result["runs"]}
    assert fpt["b_latent_moe"] == pytest.approx(fpt["b_plain_moe"], rel=0.05)  # equal active compute
    assert json.loads(out.with_suffix(".json").read_text())["summary"]
    assert out.with_suffix(".png").stat().st_size > 1000
