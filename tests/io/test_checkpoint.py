"""Checkpoint I/O: hub names, sharding, validation errors, memory check, transformers in both directions."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import NemotronHConfig
from transformers import NemotronHForCausalLM as HFModel

import nemotron3
from nemotron3.config import preset
from nemotron3.io import checkpoint
from nemotron3.io.checkpoint import CheckpointMismatchError, save_checkpoint


@pytest.fixture(scope="module")
def tiny():
    return nemotron3.load_model("tiny", seed=3)


def test_hub_names_and_per_expert_tensors(tiny, tmp_path):
    save_checkpoint(tiny, tiny.config, tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        up3 = f.get_tensor("backbone.layers.1.mixer.experts.3.up_proj.weight")
    assert torch.equal(up3, tiny.backbone.layers[1].mixer.experts.up_proj[3])
    assert {"backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight",
            "backbone.layers.0.mixer.A_log", "backbone.layers.1.mixer.gate.e_score_correction_bias",
            "mtp.layers.0.eh_proj.weight", "mtp.layers.1.final_layernorm.weight",
            "mtp.layers.1.mixer.experts.7.down_proj.weight"} <= names  # fmt: skip
    assert not any(n.endswith("experts.up_proj") for n in names)
    main = [n for n in names if not n.startswith("mtp.")]
    assert len(main) == 75  # research/architecture.md §9.2: 75 main tensors for this config


def test_sharded_round_trip_is_exact(tiny, tmp_path):
    save_checkpoint(tiny, tiny.config, tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tiny.state_dict().values())
    again = nemotron3.load_model(tmp_path)
    for (name, a), b in zip(tiny.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b) and a.dtype == b.dtype, name


def test_one_error_lists_every_problem(tiny, tmp_path):
    save_checkpoint(tiny, tiny.config, tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    del state["backbone.layers.0.mixer.D"], state["lm_head.weight"]
    state["backbone.layers.9.mixer.extra.weight"] = torch.zeros(2)
    state["backbone.layers.3.mixer.q_proj.weight"] = torch.zeros(3, 64)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError) as err:
        nemotron3.load_model(tmp_path)
    msg = str(err.value)
    for needle in ("2 missing", "backbone.layers.0.mixer.D", "lm_head.weight", "1 unexpected",
                   "backbone.layers.9.mixer.extra.weight", "1 wrong shape", "q_proj.weight: checkpoint [3, 64], model [64, 64]"):  # fmt: skip
        assert needle in msg, needle


def test_quantized_checkpoint_is_refused_clearly(tiny, tmp_path):
    save_checkpoint(tiny, tiny.config, tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state["backbone.layers.0.mixer.in_proj.weight_scale"] = torch.ones(1)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match="quantized"):
        nemotron3.load_model(tmp_path)


def test_memory_check_fails_fast_with_both_sizes(tiny, tmp_path, monkeypatch):
    save_checkpoint(tiny, tiny.config, tmp_path)
    monkeypatch.setattr(checkpoint, "available_memory", lambda: 1000)
    with pytest.raises(MemoryError, match=r"needs \d+\.\d\d (KiB|MiB) of memory but only 1000 B is available"):
        nemotron3.load_model(tmp_path)
    monkeypatch.setattr(checkpoint, "available_memory", lambda: 64 << 30)
    with pytest.raises(MemoryError, match=r"ultra-550b-a55b.*needs 1044\.06 GiB .* only 64\.00 GiB"):
        nemotron3.load_model("ultra-550b-a55b", dtype=torch.bfloat16)


def test_bf16_load_keeps_selection_bias_and_mamba_scalars_fp32(tiny, tmp_path):
    save_checkpoint(tiny, tiny.config, tmp_path)
    low = nemotron3.load_model(tmp_path, dtype=torch.bfloat16)
    assert low.backbone.layers[1].mixer.gate.e_score_correction_bias.dtype == torch.float32
    assert low.backbone.layers[0].mixer.A_log.dtype == torch.float32
    assert low.backbone.layers[0].mixer.in_proj.weight.dtype == torch.bfloat16


def hf_twin(cfg):
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "model_type")}
    return NemotronHConfig(**d)


@torch.no_grad()
def test_transformers_loads_what_we_write(tiny, tmp_path):
    save_checkpoint(tiny, tiny.config, tmp_path)
    hf = HFModel.from_pretrained(tmp_path).eval()
    ours = nemotron3.load_model(tmp_path, dt_clamp="transformers")
    for name, t in hf.state_dict().items():
        mine = ours.state_dict()[name.replace("model.", "backbone.", 1)]
        assert torch.equal(t, mine), name
    ids = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(0))
    ref = hf(ids).logits
    assert ((ours(ids).logits - ref).norm() / ref.norm()).item() < 1e-5


@torch.no_grad()
def test_we_load_what_transformers_writes(tmp_path):
    cfg = preset("tiny")
    torch.manual_seed(0)
    hf = HFModel(hf_twin(cfg)).eval()
    hf.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = nemotron3.load_model(tmp_path)  # transformers drops mtp.*: we warn and load without MTP
    assert any("no mtp.* tensors" in str(w.message) for w in caught)
    assert ours.mtp is None
    for name, t in hf.state_dict().items():
        assert torch.equal(t, ours.state_dict()[name.replace("model.", "backbone.", 1)]), name


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="neither a checkpoint directory nor a preset"):
        nemotron3.load_model(tmp_path / "nowhere")
    preset("tiny").to_json(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        nemotron3.load_model(tmp_path)
    with pytest.raises(ValueError, match="dt_clamp"):
        nemotron3.load_model("tiny", dt_clamp="never")
