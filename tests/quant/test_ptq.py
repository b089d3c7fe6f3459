"""PTQ: calibration, quantization and the on-disk ModelOpt layout (research/nvfp4.md §3) of `nemotron3.quant.ptq`."""

import json

import pytest
import torch
from safetensors import safe_open

import nemotron3
from nemotron3.quant.fp8 import FP8_DTYPE
from nemotron3.quant.nvfp4 import nvfp4_quantize
from nemotron3.quant.ptq import calibrate, calibration_batches, plan_model, quantize_checkpoint
from nemotron3.quant.recipe import ULTRA

SEED, CALIB, LEN = 3, 3, 48


def read_meta(directory):
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118


def read_tensors(directory, names):
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        return {n: f.get_tensor(n) for n in names}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny float checkpoint (every layer kind, LatentMoE, MTP) with a tokenizer_config.json beside it."""
    d = tmp_path_factory.mktemp("src")
    m = nemotron3.load_model("tiny", seed=SEED)
    nemotron3.save_checkpoint(m, m.config, d)
    (d / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    return d


@pytest.fixture(scope="module")
def ultra_dir(src, tmp_path_factory):
    d = tmp_path_factory.mktemp("ultra")
    quantize_checkpoint(src, d, "ultra", calib=CALIB, seq_len=LEN, overwrite=True, seed=0, progress=False)
    return d


def test_ultra_layout_names_dtypes_shapes(ultra_dir):
    meta = read_meta(ultra_dir)
    m = nemotron3.load_model("tiny")
    c = m.config
    L, F_, H = c.moe_latent_size, c.moe_intermediate_size, c.hidden_size
    for layer in (1, 4):  # MoE layers: every routed expert NVFP4, one tensor set per expert
        for e in range(c.n_routed_experts):
            for proj, (o, i) in (("up_proj", (F_, L)), ("down_proj", (L, F_))):
                p = f"backbone.layers.{layer}.mixer.experts.{e}.{proj}"
                assert meta[f"{p}.weight"] == ("U8", (o, i // 2))
                assert meta[f"{p}.weight_scale"] == ("F8_E4M3", (o, i // 16))
                assert meta[f"{p}.weight_scale_2"] == ("F32", ())
                assert meta[f"{p}.input_scale"] == ("F32", ())
        S = c.moe_shared_expert_intermediate_size
        for proj, shape in (("up_proj", (S, H)), ("down_proj", (H, S))):
            p = f"backbone.layers.{layer}.mixer.shared_experts.{proj}"
            assert meta[f"{p}.weight"] == ("F8_E4M3", shape)
            assert meta[f"{p}.weight_scale"] == ("F32", ()) and meta[f"{p}.input_scale"] == ("F32", ())
        assert meta[f"backbone.layers.{layer}.mixer.fc1_latent_proj.weight"] == ("BF16", (L, H))
        assert meta[f"backbone.layers.{layer}.mixer.gate.e_score_correction_bias"][0] == "F32"
    for layer in (0, 2):  # Mamba in/out_proj FP8, the rest BF16 (A_log, D, dt_bias float32)
        assert meta[f"backbone.layers.{layer}.mixer.in_proj.weight"][0] == "F8_E4M3"
        assert meta[f"backbone.layers.{layer}.mixer.out_proj.input_scale"] == ("F32", ())
        assert meta[f"backbone.layers.{layer}.mixer.conv1d.weight"][0] == "BF16"
        assert meta[f"backbone.layers.{layer}.mixer.A_log"][0] == "F32"
    for proj in "qkvo":
        assert meta[f"backbone.layers.3.mixer.{proj}_proj.weight"][0] == "BF16"
    assert meta["backbone.layers.3.mixer.k_proj.k_scale"] == ("F32", ())
    assert meta["backbone.layers.3.mixer.v_proj.v_scale"] == ("F32", ())
    assert meta["lm_head.weight"][0] == meta["backbone.embeddings.weight"][0] == "BF16"
    mtp = {n: v for n, v in meta.items() if n.startswith("mtp.")}
    assert mtp and all(dt in ("BF16", "F32") for dt, _ in mtp.values())  # MTP stays unquantized
    assert "mtp.layers.1.mixer.experts.0.up_proj.weight" in mtp  # per-expert disk names there too
    assert not any(n.endswith(("k_scale", "v_scale")) for n in mtp)


def test_ultra_json_files(ultra_dir):
    hf = json.loads((ultra_dir / "hf_quant_config.json").read_text())
    q = hf["quantization"]
    assert q["quant_algo"] == "MIXED_PRECISION" and q["kv_cache_quant_algo"] == "FP8"
    layers = q["quantized_layers"]
    assert len(layers) == 2 * 8 * 2 + 2 * 2 + 2 * 2  # routed experts + shared experts + Mamba in/out
    assert layers["backbone.layers.1.mixer.experts.7.down_proj"] == {"quant_algo": "NVFP4", "group_size": 16}
    assert layers["backbone.layers.4.mixer.shared_experts.up_proj"] == {"quant_algo": "FP8"}
    assert layers["backbone.layers.2.mixer.in_proj"] == {"quant_algo": "FP8"}
    assert not any(n.startswith("mtp.") or "q_proj" in n or "latent" in n for n in layers)
    assert q["exclude_modules"] == ["mtp*"]
    cfg = json.loads((ultra_dir / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "MIXED_PRECISION"
    assert qc["quantized_layers"] == layers and qc["kv_cache_scheme"] == {
        "dynamic": False,
        "num_bits": 8,
        "type": "float",
    }
    groups = {g["weights"]["num_bits"]: g for g in qc["config_groups"].values()}
    assert (
        groups[4]["weights"]["group_size"] == 16 and len(groups[4]["targets"]) == 32 and len(groups[8]["targets"]) == 8
    )
    assert cfg["model_type"] == "nemotron_h" and cfg["num_nextn_predict_layers"] == 1
    assert (ultra_dir / "tokenizer_config.json").is_file()  # tokenizer files travel with the checkpoint


def test_values_are_the_codecs_and_the_calibrated_amax(src, ultra_dir):
    """Weights/scales byte-equal to nvfp4_quantize of the float weights; input/KV scales = amax/2688, amax/448
    of the activations seen on the same calibration windows (recorded here with independent hooks)."""
    model = nemotron3.load_model(src)
    expert = model.backbone.layers[1].mixer.experts.up_proj[5]
    ref = nvfp4_quantize(expert)
    p = "backbone.layers.1.mixer.experts.5.up_proj"
    disk = read_tensors(ultra_dir, [f"{p}.weight", f"{p}.weight_scale", f"{p}.weight_scale_2",
                                    "backbone.layers.0.mixer.in_proj.input_scale", "backbone.layers.3.mixer.v_proj.v_scale",
                                    "backbone.layers.0.mixer.in_proj.weight", "backbone.layers.0.mixer.in_proj.weight_scale"])  # fmt: skip
    assert torch.equal(disk[f"{p}.weight"], ref.weight)
    assert torch.equal(disk[f"{p}.weight_scale"].view(torch.uint8), ref.weight_scale.view(torch.uint8))
    assert disk[f"{p}.weight_scale_2"].item() == (expert.abs().amax() / 2688).item()
    w = model.backbone.layers[0].mixer.in_proj.weight
    assert disk["backbone.layers.0.mixer.in_proj.weight"].dtype == FP8_DTYPE
    assert disk["backbone.layers.0.mixer.in_proj.weight_scale"].item() == (w.abs().amax() / 448).item()
    seen = {"in": torch.zeros(()), "v": torch.zeros(())}
    h1 = model.backbone.layers[0].mixer.in_proj.register_forward_hook(
        lambda m, a, o: seen.__setitem__("in", torch.maximum(seen["in"], a[0].abs().max()))
    )
    h2 = model.backbone.layers[3].mixer.v_proj.register_forward_hook(
        lambda m, a, o: seen.__setitem__("v", torch.maximum(seen["v"], o.abs().max())))  # fmt: skip
    with torch.no_grad():
        for ids in calibration_batches(CALIB, LEN, model.config.vocab_size, seed=0):
            model(ids)
    h1.remove(), h2.remove()
    assert disk["backbone.layers.0.mixer.in_proj.input_scale"].item() == pytest.approx(
        (seen["in"] / 448).item(), rel=1e-6
    )
    assert disk["backbone.layers.3.mixer.v_proj.v_scale"].item() == pytest.approx((seen["v"] / 448).item(), rel=1e-6)


def test_unrouted_experts_get_the_layer_max():
    model = nemotron3.load_model("tiny")
    plan = plan_model(model, ULTRA)
    cal = calibrate(model, plan, [torch.tensor([[5]])], progress=False)  # one token: 2 of 8 experts routed
    name = "backbone.layers.1.mixer.experts"
    routed = cal.routed[name] > 0
    assert int(routed.sum()) == 2
    amax = cal.expert_amax(name, "up_proj")
    assert torch.all(amax[~routed] == amax[routed].max()) and torch.all(amax > 0)


def test_single_format_recipe_and_weight_only(src, tmp_path):
    quantize_checkpoint(src, tmp_path / "a", "nvfp4-aggressive", calib=2, seq_len=16, progress=False)
    q = json.loads((tmp_path / "a" / "hf_quant_config.json").read_text())["quantization"]
    assert q["quant_algo"] == "NVFP4" and q["group_size"] == 16 and q["kv_cache_quant_algo"] == "FP8"
    ex = q["exclude_modules"]
    assert {"lm_head", "backbone.layers.3.mixer.q_proj", "backbone.layers.1.mixer.fc2_latent_proj", "mtp*"} <= set(ex)
    assert not any("in_proj" in n or "experts" in n for n in ex)
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ex and qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert read_meta(tmp_path / "a")["backbone.layers.5.mixer.up_proj.weight"][0] == "U8"  # dense MLP too
    # calib=0: weight-only, no input_scale, no KV scales, W4A16_NVFP4 / FP8 per layer
    quantize_checkpoint(src, tmp_path / "b", "ultra", calib=0, progress=False)
    meta = read_meta(tmp_path / "b")
    assert not any(n.endswith(("input_scale", "k_scale", "v_scale")) for n in meta)
    q = json.loads((tmp_path / "b" / "hf_quant_config.json").read_text())["quantization"]
    assert q["kv_cache_quant_algo"] is None
    assert q["quantized_layers"]["backbone.layers.1.mixer.experts.0.up_proj"]["quant_algo"] == "W4A16_NVFP4"
    for d in ("a", "b"):
        logits = nemotron3.load_model(tmp_path / d)(torch.tensor([[1, 2, 3]])).logits
        assert torch.isfinite(logits).all()


def test_calibration_batches():
    a = calibration_batches(3, 8, 256, text="hello world, " * 10)
    assert [t.shape for t in a] == [(1, 8)] * 3 and a[0].tolist()[0][:5] == list(b"hello")
    assert torch.equal(a[-1][0], torch.tensor(list(("hello world, " * 10).encode()))[-8:])
    short = calibration_batches(2, 50, 100, text="abc")
    assert all(t.shape == (1, 50) for t in short)
    r1, r2 = calibration_batches(2, 8, 100, seed=1), calibration_batches(2, 8, 100, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(r1, r2)) and all(int(t.max()) < 100 for t in r1)
    with pytest.raises(ValueError):
        calibration_batches(0, 8, 100)


def test_destination_and_source_errors(src, ultra_dir, tmp_path):
    with pytest.raises(FileExistsError, match="not empty"):
        quantize_checkpoint(src, ultra_dir, "ultra", calib=0, progress=False)
    with pytest.raises(ValueError, match="unknown recipe"):
        quantize_checkpoint(src, tmp_path / "x", "int3", progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(ultra_dir, tmp_path / "y", "ultra", progress=False)
