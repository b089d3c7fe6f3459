"""evaluate_ruler: the (depth x length) grid, skipped lengths over the engine limit, scripted accuracy."""

from __future__ import annotations

import pytest

from nemotron3.eval import RulerConfig, common, evaluate_ruler, ruler
from tests.eval.scripted import scripted_generate


def test_grid_and_skipped_lengths(tiny_ckpt) -> None:
    r = evaluate_ruler(tiny_ckpt, RulerConfig([48, 96, 4200], [0.0, 1.0], n=2, thinking=False, max_tokens=3))
    assert r["lengths"] == [48, 96] and r["requested_lengths"] == [48, 96, 4200]
    assert r["skipped"] and r["skipped"][0]["length"] == 4200 and "max_model_len" in r["skipped"][0]["note"]
    assert r["max_model_len"] <= r["max_position_embeddings"]
    assert len(r["cells"]) == 4 and len(r["accuracy_grid"]) == 2 and len(r["accuracy_grid"][0]) == 2
    for c in r["cells"]:
        assert 0 <= c["accuracy"] <= 1 and c["seconds"] > 0
        assert c["length"] <= c["mean_context_tokens"] <= c["length"] + 40


@pytest.mark.parametrize("correct", [True, False])
def test_scripted_accuracy(tiny_ckpt, monkeypatch, correct) -> None:
    made = []
    original = ruler.retrieval_task

    def recording(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(ruler, "retrieval_task", recording)
    monkeypatch.setattr(common, "generate_with_budget", scripted_generate(lambda: made, correct))
    r = evaluate_ruler(tiny_ckpt, RulerConfig([40], [0.5], n=3))
    assert r["accuracy_grid"] == [[1.0 if correct else 0.0]]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="--depths"):
        RulerConfig(depths=[1.5]).validate()
    with pytest.raises(ValueError, match="--lengths"):
        RulerConfig(lengths=[0]).validate()
