"""benchmarks/gguf_export.py and bench_llamacpp.py: the GGUF that llama.cpp reads, and the comparison's plumbing.

The GGUF is read back with PyPI gguf's own reader and checked tensor by tensor against the model, with the
transforms llama.cpp's nemotron-h loader expects (research/perf.md §4.1). llama.cpp itself is not installed
in CI (a ~5 min source build); where it is, the smoke run checks that it returns our greedy tokens.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.benchmarks.helpers import benchmark_module

gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[2]
LLAMA_PYTHON = os.environ.get("LLAMA_PYTHON", sys.executable)  # an interpreter with llama-cpp-python, if any


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("bench_llamacpp", "gguf_export")


@pytest.fixture(scope="module")
def export():
    yield from benchmark_module("gguf_export")


def _tiny_model(pattern: str = "MEME*EME", seed: int = 0):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common as C

    from nemotron3.model.nemotron import NemotronHForCausalLM

    torch.manual_seed(seed)
    model = NemotronHForCausalLM(C.tiny(pattern)).eval()
    with torch.no_grad():  # fresh values everywhere, so a swapped or mis-shaped tensor shows
        for p in model.parameters():
            p.normal_()
    return model


def _field(reader, key):
    return reader.fields[key].contents()


def test_gguf_holds_every_tensor_as_llama_cpp_reads_it(export, tmp_path):
    model = _tiny_model(seed=1)
    c = model.config
    path = export.export_gguf(model, tmp_path / "tiny.gguf")
    r = gguf.GGUFReader(str(path))
    t = {x.name: np.asarray(x.data) for x in r.tensors}
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert all(x.tensor_type == gguf.GGMLQuantizationType.F32 for x in r.tensors)

    np.testing.assert_array_equal(t.pop("token_embd.weight"), sd["backbone.embeddings.weight"])
    np.testing.assert_array_equal(t.pop("output.weight"), sd["lm_head.weight"])
    np.testing.assert_array_equal(t.pop("output_norm.weight"), sd["backbone.norm_f.weight"])
    for i, kind in enumerate(c.hybrid_override_pattern):
        b, m = f"blk.{i}.", f"backbone.layers.{i}.mixer."
        np.testing.assert_array_equal(t.pop(b + "attn_norm.weight"), sd[f"backbone.layers.{i}.norm.weight"])
        if kind == "M":
            H = c.mamba_num_heads
            np.testing.assert_allclose(
                t.pop(b + "ssm_a"), -np.exp(sd[m + "A_log"].astype(np.float64)).reshape(H, 1), rtol=1e-6
            )
            np.testing.assert_array_equal(t.pop(b + "ssm_d"), sd[m + "D"].reshape(H, 1))
            np.testing.assert_array_equal(t.pop(b + "ssm_dt.bias"), sd[m + "dt_bias"])
            conv = sd[m + "conv1d.weight"]
            np.testing.assert_array_equal(t.pop(b + "ssm_conv1d.weight"), conv.reshape(conv.shape[0], conv.shape[2]))
            np.testing.assert_array_equal(t.pop(b + "ssm_conv1d.bias"), sd[m + "conv1d.bias"])
            norm = t.pop(b + "ssm_norm.weight")
            assert norm.shape == (c.n_groups, c.mamba_num_heads * c.mamba_head_dim // c.n_groups)
            np.testing.assert_array_equal(norm.ravel(), sd[m + "norm.weight"])
            np.testing.assert_array_equal(t.pop(b + "ssm_in.weight"), sd[m + "in_proj.weight"])
            np.testing.assert_array_equal(t.pop(b + "ssm_out.weight"), sd[m + "out_proj.weight"])
        elif kind == "*":
            for ours, theirs in (
                ("q_proj", "attn_q"),
                ("k_proj", "attn_k"),
                ("v_proj", "attn_v"),
                ("o_proj", "attn_output"),
            ):
                np.testing.assert_array_equal(t.pop(f"{b}{theirs}.weight"), sd[f"{m}{ours}.weight"])
        else:
            E, I, L = c.n_routed_experts, c.moe_intermediate_size, c.moe_latent_size
            up, down = t.pop(b + "ffn_up_exps.weight"), t.pop(b + "ffn_down_exps.weight")
            assert up.shape == (E, I, L) and down.shape == (E, L, I)
            np.testing.assert_array_equal(up, sd[m + "experts.up_proj"])
            np.testing.assert_array_equal(down, sd[m + "experts.down_proj"])
            for ours, theirs in (
                ("gate.weight", "ffn_gate_inp.weight"), ("gate.e_score_correction_bias", "exp_probs_b.bias"),
                ("fc1_latent_proj.weight", "ffn_latent_down.weight"),
                ("fc2_latent_proj.weight", "ffn_latent_up.weight"),
                ("shared_experts.up_proj.weight", "ffn_up_shexp.weight"),
                ("shared_experts.down_proj.weight", "ffn_down_shexp.weight"),
            ):  # fmt: skip
                np.testing.assert_array_equal(t.pop(b + theirs), sd[m + ours])
    assert not t, f"tensors nobody reads: {sorted(t)}"

    A = "nemotron_h_moe"
    assert _field(r, "general.architecture") == A
    assert _field(r, f"{A}.block_count") == len(c.hybrid_override_pattern)
    # llama.cpp tells the layer kinds apart by these two per-layer arrays alone
    assert _field(r, f"{A}.feed_forward_length") == [
        c.moe_intermediate_size if k == "E" else 0 for k in c.hybrid_override_pattern
    ]
    assert _field(r, f"{A}.attention.head_count_kv") == [
        c.num_key_value_heads if k == "*" else 0 for k in c.hybrid_override_pattern
    ]
    expected = {
        "embedding_length": c.hidden_size, "attention.head_count": c.num_attention_heads,
        "attention.key_length": c.head_dim, "expert_count": c.n_routed_experts,
        "expert_used_count": c.num_experts_per_tok, "moe_latent_size": c.moe_latent_size,
        "expert_shared_feed_forward_length": c.moe_shared_expert_intermediate_size,
        "ssm.inner_size": c.mamba_num_heads * c.mamba_head_dim, "ssm.time_step_rank": c.mamba_num_heads,
        "ssm.state_size": c.ssm_state_size, "ssm.group_count": c.n_groups, "ssm.conv_kernel": c.conv_kernel,
        "vocab_size": c.vocab_size, "expert_weights_norm": bool(c.norm_topk_prob),
    }  # fmt: skip
    assert {k: _field(r, f"{A}.{k}") for k in expected} == expected
    assert _field(r, "tokenizer.ggml.model") == "no_vocab"


def test_bf16_gguf_rounds_the_matrices_our_weight_dtype_narrows(export, tmp_path):
    """matrices="bf16": the tensors weight_dtype="bfloat16" narrows are BF16, rounded as torch rounds them
    (nearest even); norms, conv, A, D, biases and the embedding stay float32 and exact."""
    model = _tiny_model(seed=2)
    f32 = gguf.GGUFReader(str(export.export_gguf(model, tmp_path / "f32.gguf")))
    bf16 = gguf.GGUFReader(str(export.export_gguf(model, tmp_path / "bf16.gguf", matrices="bf16")))
    full = {t.name: np.asarray(t.data) for t in f32.tensors}
    narrowed = 0
    for t in bf16.tensors:
        data = np.asarray(t.data)
        if t.name.endswith(export.MATRICES):
            assert t.tensor_type == gguf.GGMLQuantizationType.BF16, t.name
            widened = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(full[t.name].shape)
            expected = torch.tensor(full[t.name]).to(torch.bfloat16).float().numpy()
            np.testing.assert_array_equal(widened, expected, err_msg=t.name)
            narrowed += 1
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
            np.testing.assert_array_equal(data, full[t.name], err_msg=t.name)
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    moe_layers = model.config.hybrid_override_pattern.count("E")
    assert narrowed == linears + 3 * moe_layers  # every Linear (lm_head too), plus each MoE's router and experts
    assert bf16.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16
    with pytest.raises(ValueError, match="matrices"):
        export.export_gguf(model, tmp_path / "x.gguf", matrices="q8_0")


def test_gguf_export_refuses_layers_nemotron_h_moe_cannot_hold(export, tmp_path):
    model = _tiny_model("ME-*E")
    with pytest.raises(ValueError, match="hybrid_override_pattern"):
        export.export_gguf(model, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    model = _tiny_model()
    model.config.attention_bias = True  # the check reads the config: a biased model must not lose its biases
    with pytest.raises(ValueError, match="attention_bias"):
        export.export_gguf(model, tmp_path / "y.gguf")


def test_cell_pairs_only_runs_where_both_engines_answered(bench):
    ours = [{"median_ms": 4.0}, {"median_ms": 5.0}, {"error": "timed out"}]
    llama = [{"median_ms": 6.0}, {"median_ms": 5.0}, {"median_ms": 7.0}]
    c = bench.cell(ours, llama, "median_ms", higher_is_better=False)
    assert c["ours"] == [4.0, 5.0] and c["llama.cpp"] == [6.0, 5.0, 7.0]
    assert c["paired_speedups"] == [1.5, 1.0]
    assert c["ours_speedup"] == pytest.approx(6.0 / 4.5)
    assert c["errors"] == ["timed out"]
    t = bench.cell([{"tok_s": 300.0}], [{"tok_s": 100.0}], "tok_s", higher_is_better=True)
    assert t["ours_speedup"] == 3.0 and t["paired_speedups"] == [3.0]


def test_missing_llama_cpp_is_a_clear_error(bench, capsys):
    if bench.llama_available(sys.executable):
        pytest.skip("llama-cpp-python is installed here")
    assert bench.main(["--smoke", "--llama-python", sys.executable]) == 2
    assert "llama-cpp-python" in capsys.readouterr().err
    assert bench.llama_available(str(ROOT / "no-such-python")) is None


def test_smoke_against_llama_cpp(bench, tmp_path, capsys):
    """Where llama.cpp is installed (here, or in the interpreter LLAMA_PYTHON names): the whole comparison on
    the tiny config, with the same greedy tokens."""
    if not bench.llama_available(LLAMA_PYTHON):
        pytest.skip("llama-cpp-python is not installed (not in CI: a ~5 min source build); LLAMA_PYTHON names one")
    assert bench.main(["--smoke", "--llama-python", LLAMA_PYTHON, "--out", str(tmp_path), "--no-plot"]) == 0
    data = json.loads((tmp_path / "llamacpp.json").read_text())
    res = data["results"]
    assert res["decode_b1"]["tiny50"]["greedy_tokens_identical"]
    assert res["decode_b1"]["tiny50 bf16"]["ours_median"] and res["decode_b1"]["tiny50 bf16"]["llama_median"]
    assert res["concurrency"]["tiny50 x4"]["ours_median"] and res["concurrency"]["tiny50 x4"]["llama_median"]
    assert set(res["context_pair"]) == {"fp32 K/V", "half K/V (bf16 / f16)"}
    assert not any("error" in x for x in data["raw"])
