"""Loading quantized checkpoints (ours and NVIDIA's ModelOpt layout), W4A16 logits, memory, BF16 export, CLI.

Tolerances: a quantized model computes every quantized projection as F.linear(x, Ŵ) with Ŵ dequantized in
float32 (nvfp4: e2m1·s_b·s2, fp8: e4m3·s, each one fp32 rounding, the same values `dense_copy` stores), so
against a dense model holding exactly those weights the "layer" / "expert" / "active" strategies run the
same float32 ops on the same numbers and must agree bit for bit. The "tile" linear strategy multiplies
row blocks separately, which changes only the GEMM's blocking: float32 summation-order noise, ≲1e-6
relative, hence atol 1e-5 on logits of magnitude < 1.
"""

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import nemotron3
from nemotron3.cli import main
from nemotron3.io.checkpoint import CheckpointMismatchError, split_experts
from nemotron3.quant.experts import EXPERT_STRATEGIES, QuantizedExperts, StackedQuantWeight
from nemotron3.quant.fp8 import fp8_dequantize, fp8_quantize
from nemotron3.quant.linear import FP8Linear, NVFP4Linear
from nemotron3.quant.load import (
    QuantConfig,
    dense_copy,
    dequantize_checkpoint,
    excluded,
    quantized_weight_bytes,
    read_quant_config,
)
from nemotron3.quant.nvfp4 import nvfp4_dequantize, nvfp4_quantize
from nemotron3.quant.ptq import quantize_checkpoint

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def qdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    quantize_checkpoint("tiny", d, "ultra", calib=2, seq_len=32, progress=False)
    return d


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_load_builds_packed_modules_and_matches_dequantized_weights_exactly(qdir):
    q = nemotron3.load_model(qdir)
    mixer = q.backbone.layers[1].mixer
    assert isinstance(mixer.experts, QuantizedExperts) and mixer.experts.up_proj.format == "nvfp4"
    assert mixer.experts.up_proj.weight.dtype == torch.uint8
    assert isinstance(mixer.shared_experts.up_proj, FP8Linear)
    assert isinstance(q.backbone.layers[0].mixer.in_proj, FP8Linear)
    assert type(q.backbone.layers[3].mixer.q_proj) is torch.nn.Linear and type(q.lm_head) is torch.nn.Linear
    assert type(q.mtp.layers[1].mixer.experts).__name__ == "Experts"
    assert q.quant_config.quant_algo == "MIXED_PRECISION"
    assert q.backbone.layers[1].mixer.experts.up_proj.input_scale.shape == (8,)
    out = logits(q)
    ref = dense_copy(nemotron3.load_model(qdir))
    assert torch.equal(out, logits(ref))
    for strategy in EXPERT_STRATEGIES:
        for block in q.backbone.layers:
            if isinstance(getattr(block.mixer, "experts", None), QuantizedExperts):
                block.mixer.experts.strategy = strategy
        assert torch.equal(logits(q), out), strategy
    for m in q.modules():
        if isinstance(m, FP8Linear | NVFP4Linear):
            m.strategy, m.tile_rows = "tile", 16
    torch.testing.assert_close(logits(q), out, rtol=0, atol=1e-5)


def test_quantized_model_is_close_to_the_float_model_and_decodes_with_a_cache(qdir):
    q = nemotron3.load_model(qdir)
    f = nemotron3.load_model("tiny")
    out, ref = logits(q), logits(f)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.1  # NVFP4 weights ≈ 9.5% rel. error each (nvfp4.md §8); the residual stream dilutes it
    cache = q.new_cache(1)
    with torch.no_grad():
        step = [q(IDS[:1, :12], cache).logits[:, -1]]
        for t in range(12, 16):
            step.append(q(IDS[:1, t : t + 1], cache).logits[:, -1])
    torch.testing.assert_close(torch.cat(step[1:]), out[0, 12:16], rtol=1e-4, atol=1e-4)
    llm = nemotron3.LLM(q)
    got = llm.generate([{"prompt_token_ids": [3, 4, 5]}], nemotron3.SamplingParams(temperature=0.0, max_tokens=4))
    assert len(got[0].outputs[0].token_ids) == 4


def test_memory_nvfp4_is_4_5_of_16_bits(qdir):
    q = nemotron3.load_model(qdir, dtype=torch.bfloat16)
    for block in q.backbone.layers:
        experts = getattr(block.mixer, "experts", None)
        if isinstance(experts, QuantizedExperts):
            for s in (experts.up_proj, experts.down_proj):
                bf16 = s.num_experts * s.out_features * s.in_features * 2
                # 4 bits + an 8-bit scale per 16 weights, + one fp32 weight_scale_2 per expert matrix
                assert s.nbytes() == bf16 * 4.5 / 16 + 4 * s.num_experts
                assert 4.5 / 16 <= s.nbytes() / bf16 < 4.5 / 16 + 0.01
    fp8 = q.backbone.layers[0].mixer.in_proj
    assert fp8.quantized_nbytes() == fp8.in_features * fp8.out_features + 4
    b = quantized_weight_bytes(q)
    assert b["nvfp4"] == sum(e.quantized_nbytes() for e in q.modules() if isinstance(e, QuantizedExperts))
    assert b["fp8"] > 0 and b["other"] > 0


def test_dequantize_export_is_the_rounded_dequantized_weights(qdir, tmp_path):
    dequantize_checkpoint(qdir, tmp_path)
    assert not (tmp_path / "hf_quant_config.json").exists()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in cfg
    q = nemotron3.load_model(qdir)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert not any(n.endswith(("_scale", "_scale_2")) for n in names)
        w = f.get_tensor("backbone.layers.4.mixer.experts.6.down_proj.weight")
        assert w.dtype == torch.bfloat16
        assert torch.equal(w, q.backbone.layers[4].mixer.experts.down_proj.dequantize(6, torch.bfloat16))
        assert f.get_tensor("backbone.layers.0.mixer.A_log").dtype == torch.float32
    d = nemotron3.load_model(tmp_path)  # a plain checkpoint: the ordinary loader
    assert type(d.backbone.layers[0].mixer.in_proj) is torch.nn.Linear
    ref = logits(dense_copy(nemotron3.load_model(qdir, dtype=torch.bfloat16), torch.bfloat16))
    torch.testing.assert_close(logits(nemotron3.load_model(tmp_path, dtype=torch.bfloat16)), ref, rtol=0, atol=0)
    torch.testing.assert_close(logits(d), logits(q), rtol=0.02, atol=0.02)  # bf16 rounding of the weights


def _nvidia_style_checkpoint(directory):
    """Hand-built MIXED_PRECISION checkpoint as NVIDIA's exporter lays it out: config only in config.json
    (quant_method modelopt, no hf_quant_config.json), `language_model.` prefix, [1]-shaped scalars, a
    W4A16_NVFP4 layer without input_scale, FP8 routed experts, KV scales. Returns the dense reference model."""
    m = nemotron3.load_model("tiny", seed=7)
    state = dict(split_experts(m.state_dict()))
    out, layers = {}, {}

    def put_nvfp4(name, algo="NVFP4"):
        w = state.pop(f"{name}.weight")
        q = nvfp4_quantize(w)
        out.update({f"{name}.weight": q.weight, f"{name}.weight_scale": q.weight_scale,
                    f"{name}.weight_scale_2": q.weight_scale_2.reshape(1)})  # fmt: skip
        if algo == "NVFP4":
            out[f"{name}.input_scale"] = torch.tensor([0.01])
        layers[name] = {"quant_algo": algo, "group_size": 16}
        return nvfp4_dequantize(q.weight, q.weight_scale, q.weight_scale_2)

    def put_fp8(name):
        w = state.pop(f"{name}.weight")
        q = fp8_quantize(w)
        out.update(
            {
                f"{name}.weight": q.weight,
                f"{name}.weight_scale": q.weight_scale,
                f"{name}.input_scale": torch.tensor(0.1),
            }
        )
        layers[name] = {"quant_algo": "FP8"}
        return fp8_dequantize(q.weight, q.weight_scale)

    with torch.no_grad():
        mix0, moe = m.backbone.layers[0].mixer, m.backbone.layers[4].mixer
        mix0.in_proj.weight.copy_(put_nvfp4("backbone.layers.0.mixer.in_proj"))
        mix0.out_proj.weight.copy_(put_fp8("backbone.layers.0.mixer.out_proj"))
        moe.shared_experts.up_proj.weight.copy_(
            put_nvfp4("backbone.layers.4.mixer.shared_experts.up_proj", "W4A16_NVFP4")
        )
        for e in range(8):
            moe.experts.up_proj[e].copy_(put_fp8(f"backbone.layers.4.mixer.experts.{e}.up_proj"))
            moe.experts.down_proj[e].copy_(put_nvfp4(f"backbone.layers.4.mixer.experts.{e}.down_proj"))
    out.update(state)
    out["backbone.layers.3.mixer.k_proj.k_scale"] = torch.tensor(1.0)
    out["backbone.layers.3.mixer.v_proj.v_scale"] = torch.tensor(1.0)
    save_file({f"language_model.{k}": v.contiguous() for k, v in out.items()}, directory / "model.safetensors")
    qc = {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION", "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"},
          "producer": {"name": "modelopt", "version": "0.47.0"}, "quantized_layers": layers, "ignore": []}  # fmt: skip
    cfg = m.config.replace(extra={**m.config.extra, "quantization_config": qc})
    cfg.to_json(directory)
    return m


def test_nvidia_mixed_precision_checkpoint_loads(tmp_path):
    ref = _nvidia_style_checkpoint(tmp_path)
    qc = read_quant_config(tmp_path)
    assert qc.mixed and qc.kv_cache_quant_algo == "FP8"
    assert qc.algo_for("backbone.layers.4.mixer.experts.3.up_proj") == "FP8"
    q = nemotron3.load_model(tmp_path)
    moe = q.backbone.layers[4].mixer
    assert moe.experts.up_proj.format == "fp8" and moe.experts.down_proj.format == "nvfp4"
    assert isinstance(moe.shared_experts.up_proj, NVFP4Linear) and moe.shared_experts.up_proj.input_scale is None
    assert type(q.backbone.layers[1].mixer.experts).__name__ == "Experts"  # layer 1 left unquantized
    assert torch.equal(logits(q), logits(ref))


def test_exclude_patterns_and_single_format_config():
    pats = ["lm_head", "backbone.layers.5*", "*.mixer.q_proj", "mtp*"]
    assert excluded("backbone.layers.5.mixer.in_proj", pats) and excluded("backbone.layers.5", pats)
    assert not excluded("backbone.layers.50.mixer.in_proj", pats)  # vLLM's reading of `X*`: X and X.*
    assert excluded("backbone.layers.7.mixer.q_proj", pats) and excluded("mtp.layers.0.mixer.k_proj", pats)
    assert excluded("lm_head", pats) and not excluded("backbone.layers.7.mixer.k_proj", pats)
    qc = QuantConfig.from_dict({"producer": {"name": "modelopt", "version": "0.29.0"},
                                "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None,
                                                 "group_size": 16, "exclude_modules": pats}})  # fmt: skip
    assert qc.algo_for("backbone.layers.1.mixer.experts.0.up_proj") == "NVFP4" and qc.algo_for("lm_head") is None
    assert QuantConfig.from_dict(qc.config_json_form()).exclude_modules == pats
    with pytest.raises(ValueError, match="compressed-tensors"):
        QuantConfig.from_dict({"quant_method": "compressed-tensors", "quant_algo": "NVFP4"})


def test_bad_quantized_checkpoints(qdir, tmp_path):
    def copy_with(mutate, name):
        d = tmp_path / name
        d.mkdir()
        for f in ("config.json", "hf_quant_config.json"):
            (d / f).write_text((qdir / f).read_text())
        with safe_open(qdir / "model.safetensors", framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        mutate(d, state)
        save_file(state, d / "model.safetensors")
        return d

    d = copy_with(lambda d, s: s.pop("backbone.layers.1.mixer.experts.2.up_proj.weight_scale"), "missing")
    with pytest.raises(CheckpointMismatchError, match=r"1 missing:\n.*experts.2.up_proj.weight_scale"):
        nemotron3.load_model(d)

    def bad_shape(d, s):
        s["backbone.layers.0.mixer.in_proj.weight_scale"] = torch.ones(3)

    with pytest.raises(CheckpointMismatchError, match=r"in_proj.weight_scale: checkpoint F32 \[3\], expected F32 \[\]"):
        nemotron3.load_model(copy_with(bad_shape, "shape"))

    def unsupported(d, s):
        hf = json.loads((d / "hf_quant_config.json").read_text())
        hf["quantization"]["quantized_layers"]["backbone.layers.0.mixer.in_proj"]["quant_algo"] = "FP8_PB_WO"
        (d / "hf_quant_config.json").write_text(json.dumps(hf))

    with pytest.raises(CheckpointMismatchError, match="FP8_PB_WO"):
        nemotron3.load_model(copy_with(unsupported, "algo"))

    def disagree(d, s):
        hf = json.loads((d / "hf_quant_config.json").read_text())
        del hf["quantization"]["quantized_layers"]["backbone.layers.2.mixer.out_proj"]
        (d / "hf_quant_config.json").write_text(json.dumps(hf))

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        nemotron3.load_model(copy_with(disagree, "disagree"))
    assert any(
        "layers.2.mixer.out_proj is stored fp8 but the config leaves it unquantized" in str(x.message) for x in w
    )


def test_stacked_weight_validation():
    with pytest.raises(ValueError, match="stacked NVFP4"):
        StackedQuantWeight("nvfp4", torch.zeros(2, 4, 8, dtype=torch.uint8), torch.zeros(2, 4, 1), torch.ones(2))
    with pytest.raises(ValueError, match="format"):
        StackedQuantWeight("int4", torch.zeros(2, 4, 8, dtype=torch.uint8), torch.zeros(2))


# ------------------------------------------------------------------------------------------ CLI


@pytest.mark.filterwarnings("ignore:no tokenizer.json")
def test_cli_quantize_and_dequantize(tmp_path, capsys):
    dst = tmp_path / "q"
    assert main(["quantize", "tiny", str(dst), "--recipe", "ultra", "--calib", "1", "--calib-len", "16"]) == 0
    assert "MIXED_PRECISION" in capsys.readouterr().out and (dst / "hf_quant_config.json").is_file()
    text = tmp_path / "calib.txt"
    text.write_text("To be, or not to be, that is the question. " * 4)
    args = ["quantize", "tiny", str(dst), "--calib", "2", "--calib-len", "16", "--calib-text", str(text)]
    assert main(args) == 2 and "not empty" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert main(["dequantize", str(dst), str(tmp_path / "dq")]) == 0
    assert nemotron3.load_model(tmp_path / "dq").backbone.layers[0].mixer.in_proj.weight.dtype == torch.float32


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["quantize", "tiny", "{t}/a", "--recipe", "int3"], "unknown recipe 'int3'"),
        (["quantize", "{t}/nowhere", "{t}/b"], "neither a checkpoint directory nor a preset"),
        (["quantize", "tiny", "{t}/c", "--calib", "-1"], "--calib must be >= 0"),
        (["quantize", "tiny", "{t}/d", "--calib-text", "{t}/missing.txt"], "no such file"),
        (["dequantize", "{t}/nowhere", "{t}/e"], "no such checkpoint directory"),
    ],
)
def test_cli_errors_exit_2(tmp_path, capsys, argv, needle):
    assert main([a.format(t=tmp_path) for a in argv]) == 2
    assert needle in capsys.readouterr().err


def test_cli_dequantize_refuses_a_plain_checkpoint(tmp_path, capsys):
    m = nemotron3.load_model("tiny")
    nemotron3.save_checkpoint(m, m.config, tmp_path / "plain")
    assert main(["dequantize", str(tmp_path / "plain"), str(tmp_path / "out")]) == 2
    assert "not a quantized checkpoint" in capsys.readouterr().err
