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


def test_cli_scores_a_prompt_as_the_engine_does(capsys) -> None:
    """`generate --prompt-logprobs/--logprobs --json`: the prompt's summed logprob and perplexity, and each token's
    entry, equal to LLM's own RequestOutput."""
    import json
    import math

    argv = ["generate", "--prompt", "KING. Good morrow", "--max-tokens", "3", "--prompt-logprobs", "1",
            "--logprobs", "2", "--json"]  # fmt: skip
    assert main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    params = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=1, logprobs=2)
    want = LLM("default").generate("KING. Good morrow", params)[0]
    ids, entries = want.prompt_token_ids, want.prompt_logprobs
    total = sum(e[t].logprob for e, t in zip(entries[1:], ids[1:]))
    score = line["prompt_score"]
    assert score["tokens"] == len(ids) - 1 and math.isclose(score["logprob"], total, rel_tol=1e-6)
    assert math.isclose(score["perplexity"], math.exp(-total / (len(ids) - 1)), rel_tol=1e-6)
    assert line["prompt_logprobs"][0] is None and len(line["prompt_logprobs"]) == len(ids)
    assert line["token_ids"] == want.outputs[0].token_ids and len(line["logprobs"]) == 3
    assert math.isclose(line["cumulative_logprob"], want.outputs[0].cumulative_logprob, rel_tol=1e-6)
    assert main(["generate", "--prompt", "KING.", "--max-tokens", "2", "--prompt-logprobs", "0"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["generate", "--prompt", "KING.", "--prompt-logprobs", "-1"]) == 2  # a usage error naming it
    assert "prompt_logprobs" in capsys.readouterr().err


def test_cli_beam_search_prints_the_beams_best_first(capsys) -> None:
    """`generate --beam-width K --json`: K lines, the engine's beams in order; sampling-only flags are refused."""
    import json

    from nemotron3 import BeamSearchParams

    argv = ["generate", "--prompt", "KING.", "--max-tokens", "5", "--beam-width", "3", "--json"]
    assert main(argv) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    llm = LLM("default")
    (want,) = llm.beam_search("KING.", BeamSearchParams(beam_width=3, max_tokens=5))
    n_prompt = len(llm.get_tokenizer().encode("KING."))
    assert [x["token_ids"] for x in lines] == [s.tokens[n_prompt:] for s in want.sequences]
    assert [x["index"] for x in lines] == [0, 1, 2]
    assert [x["cumulative_logprob"] for x in lines] == [s.cum_logprob for s in want.sequences]
    assert main([*argv, "--stop", "\n", "-n", "2"]) == 2
    assert "--stop, -n: not with --beam-width" in capsys.readouterr().err
