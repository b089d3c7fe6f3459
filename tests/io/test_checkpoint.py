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


def read_file(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a single-file checkpoint, to tamper with in a test."""
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)


@pytest.fixture(scope="module")
def tiny():
    return nemotron3.load_model("tiny", seed=3)


def test_name_mapping_round_trip(tiny):
    state = tiny.state_dict()
    disk = dict(checkpoint.split_experts(state))
    assert "backbone.layers.1.mixer.experts.7.down_proj.weight" in disk
    assert (
        disk["backbone.layers.1.mixer.experts.2.up_proj.weight"].shape
        == state["backbone.layers.1.mixer.experts.up_proj"].shape[1:]
    )
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    assert checkpoint.expected_disk_shapes(shapes) == {n: tuple(t.shape) for n, t in disk.items()}
    back = checkpoint.stack_experts(disk)
    assert list(back) == list(state)  # same names, same order
    assert all(torch.equal(back[n], state[n]) for n in state)
    assert checkpoint.memory_name("language_model.backbone.layers.1.mixer.experts.12.up_proj.weight") == (
        "backbone.layers.1.mixer.experts.up_proj", 12)  # fmt: skip
    assert checkpoint.memory_name("backbone.layers.1.mixer.shared_experts.up_proj.weight") == (
        "backbone.layers.1.mixer.shared_experts.up_proj.weight", None)  # fmt: skip
    prefixed = {"language_model." + n: t for n, t in disk.items()}
    assert list(checkpoint.stack_experts(prefixed)) == list(state)


def test_stacking_refuses_a_gap_in_expert_indices(tiny):
    disk = dict(checkpoint.split_experts(tiny.state_dict()))
    del disk["backbone.layers.1.mixer.experts.5.up_proj.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"experts.up_proj: expert indices .* are not 0..6"):
        checkpoint.stack_experts(disk)


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
    state = read_file(tmp_path)
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
    state = read_file(tmp_path)
    state["backbone.layers.0.mixer.in_proj.weight_scale"] = torch.ones(1)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match="quantized"):
        nemotron3.load_model(tmp_path)


def test_memory_check_fails_fast_with_both_sizes(tiny, tmp_path, monkeypatch):
    save_checkpoint(tiny, tiny.config, tmp_path)
    monkeypatch.setattr(checkpoint, "available_memory", lambda: 1000)
    with pytest.raises(MemoryError, match=r"needs \d+\.\d\d (KiB|MiB) of memory but only 1000 B is available"):
        nemotron3.load_model(tmp_path)


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


def test_single_file_when_it_fits_and_stale_shards_removed(tiny, tmp_path):
    save_checkpoint(tiny, tiny.config, tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    save_checkpoint(tiny, tiny.config, tmp_path)  # default 5GB: one file; the old shards must go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "nemotron_h"
    again = nemotron3.load_model(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), again.state_dict().values()))


def test_shard_sizes_and_size_strings(tiny):
    state = tiny.state_dict()
    limit = checkpoint._parse_size("30KB")
    assert limit == 30_000 and checkpoint._parse_size("2GiB") == 2 << 30 and checkpoint._parse_size(77) == 77
    shards = checkpoint.plan_shards(state, limit)
    for shard in shards:
        sizes = [t.numel() * t.element_size() for _, t in shard]
        assert sum(sizes) <= limit or len(shard) == 1  # only a lone oversized tensor may exceed the limit
    assert [n for shard in shards for n, _ in shard] == [n for n, _ in checkpoint.split_experts(state)]
    with pytest.raises(ValueError, match="max_shard_size"):
        checkpoint._parse_size("five gigs")


def test_long_lists_are_truncated_with_counts(tiny, tmp_path):
    save_checkpoint(tiny, tiny.config, tmp_path)
    state = {k: t for k, t in read_file(tmp_path).items() if ".experts." not in k}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError) as err:
        nemotron3.load_model(tmp_path)
    n_missing = sum(1 for n in dict(checkpoint.split_experts(tiny.state_dict())) if ".experts." in n)
    assert f"{n_missing} missing" in str(err.value)
    assert f"and {n_missing - 20} more" in str(err.value)


def test_uint8_tensor_is_refused_as_quantized(tiny, tmp_path):
    save_checkpoint(tiny, tiny.config, tmp_path)
    state = read_file(tmp_path)
    state["lm_head.weight"] = torch.zeros(state["lm_head.weight"].shape, dtype=torch.uint8)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"lm_head.weight: U8.*nemotron3.quant"):
        nemotron3.load_model(tmp_path)


def test_language_model_prefix_is_stripped(tiny, tmp_path):
    save_checkpoint(tiny, tiny.config, tmp_path)
    state = {"language_model." + k: t for k, t in read_file(tmp_path).items()}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    again = nemotron3.load_model(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), again.state_dict().values()))


def test_mtp_tensors_without_mtp_config_are_ignored_with_a_warning(tiny, tmp_path):
    save_checkpoint(tiny, tiny.config.replace(num_nextn_predict_layers=0), tmp_path)  # tensors keep mtp.*
    with pytest.warns(UserWarning, match=r"mtp\.\* tensors present but config.json declares no MTP layers"):
        ours = nemotron3.load_model(tmp_path)
    assert ours.mtp is None and not any(n.startswith("mtp.") for n in ours.state_dict())


def test_partial_mtp_is_an_error_not_a_warning(tiny, tmp_path):
    save_checkpoint(tiny, tiny.config, tmp_path)
    state = read_file(tmp_path)
    del state["mtp.layers.0.eh_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"1 missing:\n\s+mtp.layers.0.eh_proj.weight"):
        nemotron3.load_model(tmp_path)


def test_meta_tensors_cannot_be_saved(tmp_path):
    with pytest.raises(ValueError, match="meta device.*lm_head.weight"):
        save_checkpoint({"lm_head.weight": torch.empty(2, 2, device="meta")}, preset("tiny"), tmp_path)
