"""evaluate_perplexity: matches held_out_loss, several models, the default held-out files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from nemotron3.eval import PerplexityConfig, evaluate_perplexity
from nemotron3.eval.perplexity import default_valid_files
from nemotron3.io.tokenizer import Tokenizer
from nemotron3.loader import load_model
from nemotron3.train.config import DEFAULT_CORPUS_DIR
from nemotron3.train.evaluate import held_out_loss


def test_matches_held_out_loss(tiny_ckpt, tmp_path) -> None:
    text = tmp_path / "valid.txt"
    text.write_text("\f".join(f"document {i}: " + "to be or not to be, " * (i + 3) for i in range(4)))
    r = evaluate_perplexity(
        [f"a={tiny_ckpt}", f"b={tiny_ckpt}"], PerplexityConfig([str(text)], seq_len=16, sequences=3)
    )
    direct = held_out_loss(load_model(tiny_ckpt), Tokenizer.from_dir(tiny_ckpt), [text], 16, 3)
    for label in ("a", "b"):
        m = r["models"][label]
        assert m["sequences"] == 3 and m["tokens"] == direct["tokens"]
        assert m["loss"] == pytest.approx(direct["loss"], rel=1e-6)
        assert math.isclose(m["perplexity"], math.exp(m["loss"]))
    assert r["files"] == [str(text)]


@pytest.mark.skipif(not (Path(DEFAULT_CORPUS_DIR).expanduser() / "manifest.json").is_file(),
                    reason="the Shakespeare corpus is not built here")  # fmt: skip
def test_default_files_are_the_corpus_valid_split() -> None:
    (f,) = default_valid_files()
    assert f.name == "valid.txt" and f.is_file()


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="--files"):
        PerplexityConfig([str(tmp_path / "missing.txt")]).validate()
    with pytest.raises(ValueError, match="--seq-len"):
        PerplexityConfig(seq_len=0).validate()
