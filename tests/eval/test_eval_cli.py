"""`nemotron3 eval ...` in-process: JSON + PNG written, bad arguments exit 2 naming them."""

from __future__ import annotations

import json

import pytest

from nemotron3.cli import main
from nemotron3.eval import plots


def test_tasks_and_budget_write_json_and_png(tiny_ckpt, tmp_path) -> None:
    out = tmp_path / "tasks.json"
    assert main(["eval", "tasks", "--model", f"tiny={tiny_ckpt}", "--domains", "arithmetic:2", "--seeds", "1",
                 "--set-option", "arithmetic.digits=[1,2]", "--max-tokens", "4", "--threads", "1",
                 "--out", str(out)]) == 0  # fmt: skip
    r = json.loads(out.read_text())
    assert r["task_options"] == {"arithmetic": {"digits": [1, 2]}} and "tiny" in r["models"]
    assert (tmp_path / "tasks.png").stat().st_size > 0
    out = tmp_path / "budget.json"
    assert main(["eval", "budget", "--model", tiny_ckpt, "--label", "t", "-n", "2", "--seeds", "1",
                 "--budgets", "off,low,unbounded", "--levels", "low=2", "--max-tokens", "6",
                 "--out", str(out)]) == 0  # fmt: skip
    assert [p["budget"] for p in json.loads(out.read_text())["models"]["t"]["points"]] == ["off", "low", "unbounded"]
    assert (tmp_path / "budget.png").is_file()


def test_ruler_and_perplexity_write_json_and_png(tiny_ckpt, tmp_path) -> None:
    assert main(["eval", "ruler", "--model", tiny_ckpt, "--lengths", "40", "--depths", "0,1", "-n", "1",
                 "--thinking", "off", "--max-tokens", "2", "--out", str(tmp_path / "ruler.json")]) == 0  # fmt: skip
    assert (tmp_path / "ruler.png").is_file()
    text = tmp_path / "v.txt"
    text.write_text("to be or not to be, that is the question. " * 20)
    assert main(["eval", "perplexity", "--model", f"a={tiny_ckpt}", "--files", str(text), "--seq-len", "16",
                 "--sequences", "2", "--out", str(tmp_path / "ppl.json")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "ppl.json").read_text())["models"]["a"]["sequences"] == 2
    assert (tmp_path / "ppl.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["eval", "tasks", "--domains", "poetry:3"], "unknown domain 'poetry'"),
    (["eval", "tasks", "--model", "=x"], "--model"),
    (["eval", "budget", "--budgets", "off,-5"], "budget must be >= 0"),
    (["eval", "budget", "--levels", "low"], "--levels"),
    (["eval", "ruler", "--depths", "0,2"], "--depths"),
    (["eval", "ruler", "--lengths", "x"], "--lengths"),
    (["eval", "tasks", "--out", "r.txt"], "--out"),
    (["eval", "tasks", "--set-option", "digits=1"], "--set-option"),
])  # fmt: skip
def test_bad_arguments_exit_2(argv, message, capsys) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_eval_is_a_usage_error(capsys) -> None:
    assert main(["eval", "speed"]) == 2


def test_png_skipped_without_matplotlib(tmp_path, monkeypatch, capsys) -> None:
    import builtins

    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = {"eval": "perplexity", "files": [], "seq_len": 4, "sequences": 1,
              "models": {"a": {"loss": 1.0, "perplexity": 2.7}}}  # fmt: skip
    out, png = plots.write_result(result, tmp_path / "p.json")
    assert out.is_file() and png is None and not (tmp_path / "p.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().out
