"""Recipes: rule matching and the bits-per-element report against the published Ultra figures."""

import pytest

from nemotron3.config import preset
from nemotron3.quant.recipe import AGGRESSIVE, BF16, FP8, FP8_ALL, NVFP4, ULTRA, bits_report, get_recipe


def test_ultra_rules_pick_the_released_formats():
    expert = (512, 5120, 2048)
    assert ULTRA.format_for("backbone.layers.1.mixer.experts.up_proj", expert) is NVFP4
    assert ULTRA.format_for("backbone.layers.1.mixer.shared_experts.down_proj.weight", (8192, 10240)) is FP8
    assert ULTRA.format_for("backbone.layers.0.mixer.in_proj.weight", (34048, 8192)) is FP8
    assert ULTRA.format_for("backbone.layers.0.mixer.out_proj.weight", (8192, 16384)) is FP8
    for bf16 in ("backbone.layers.7.mixer.q_proj.weight", "backbone.layers.1.mixer.fc1_latent_proj.weight",
                 "mtp.layers.1.mixer.experts.up_proj", "lm_head.weight", "backbone.embeddings.weight"):  # fmt: skip
        assert ULTRA.format_for(bf16, expert if "experts" in bf16 else (8, 8)) is BF16, bf16
    # never quantized whatever the rules say: router, conv, norms, Mamba per-head tensors, biases
    for small in ("backbone.layers.1.mixer.gate.weight", "backbone.layers.0.mixer.conv1d.weight",
                  "backbone.layers.0.mixer.A_log", "backbone.layers.0.norm.weight", "backbone.layers.0.mixer.in_proj.bias"):  # fmt: skip
        assert AGGRESSIVE.format_for(small, (8, 8)) is BF16, small


def test_ultra_reproduces_the_published_5_03_bits_and_size():
    rep = bits_report(preset("ultra-550b-a55b"), ULTRA)
    assert abs(rep.bits_per_element - 5.03) <= 0.05  # Ultra tech report / ModelOpt blog: 5.03 bits per element
    assert abs(rep.params / 1e9 - 560.5) < 0.5  # BF16 repo "561B" = 550B main + 11.2B MTP
    assert abs(rep.bytes / 1e9 - 352.3) / 352.3 < 0.01  # NVFP4 checkpoint 352.3 GB
    rows = {r.kind: r for r in rep.rows}
    assert rows["routed experts"].formats == {"nvfp4": rows["routed experts"].params}
    assert abs(rows["routed experts"].bits_per_element - 4.5) < 1e-4  # + one fp32 pair per expert matrix
    fit = rep.fit(gpus=8, gib_per_gpu=80)
    assert fit["fits"] and 35 < fit["headroom_gib_per_gpu"] < 45  # report: ~40 GiB/GPU left on 8×H100


def test_sweep_points_of_the_paper():
    ultra = preset("ultra-550b-a55b")
    assert abs(bits_report(ultra, AGGRESSIVE).bits_per_element - 4.85) < 0.02  # shared + Mamba in NVFP4
    assert abs(bits_report(ultra, FP8_ALL).bytes / 1e9 - 577) < 3  # "all-FP8 Ultra ≈ 577 GB"


def test_report_sums_and_unknown_recipe():
    rep = bits_report(preset("tiny"), ULTRA)
    assert rep.params == sum(r.params for r in rep.rows)
    assert rep.bits == pytest.approx(sum(r.bits for r in rep.rows))
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("int3")
