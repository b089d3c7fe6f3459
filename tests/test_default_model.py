"""The embedded default model: it loads by name, matches transformers, fits the size budget, and generates.

Parity tolerance: fp32 on both sides from the same bf16-stored weights; the two implementations order
their sums differently (chunked scan, SDPA), which moves logits by ~1e-6 relative; 1e-5 relative L2 (as
the model parity tests use for small models, see tests/model/test_parity_hf.py) fails on any real
mismatch (a wrong layer or tensor moves logits by > 1e-2).
"""

from __future__ import annotations

import torch

from nemotron3 import LLM, SamplingParams, load_model
from nemotron3.cli import main
from nemotron3.default_model import DEFAULT_MODEL_DIR


def test_default_model_is_committed_within_budget() -> None:
    files = {p.name: p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert sum(files.values()) < 50 * 2**20
    model = load_model("default")
    kinds = set(model.config.layers_block_type)
    assert {"mamba", "attention", "moe"} <= kinds or {"linear_attention", "full_attention", "moe"} <= kinds
    assert model.config.moe_latent_size is not None and model.mtp is not None


@torch.no_grad()
def test_default_model_matches_transformers() -> None:
    import transformers

    ours = load_model("default", dt_clamp="transformers")
    hf = transformers.NemotronHForCausalLM.from_pretrained(str(DEFAULT_MODEL_DIR), dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    a, b = ours(ids).logits, hf(ids).logits.float()
    assert (a - b).norm() / b.norm() < 1e-5


def test_default_model_generates_text() -> None:
    llm = LLM("default")
    out = llm.generate(["ROMEO:\n"], SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0]
    assert len(out.token_ids) > 0 and out.text.strip()


def test_cli_uses_the_default_model(capsys) -> None:
    assert main(["generate", "--prompt", "KING.", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["generate", "--prompt", "KING.", "--max-tokens", "4", "--weight-dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["info", "--json"]) == 0
    assert '"model"' in capsys.readouterr().out
