"""load_model: presets with seeded random weights, checkpoint directories, dt_clamp, memory check, bad paths."""

import pytest
import torch

import nemotron3
from nemotron3.config import PRESETS, preset
from nemotron3.io import checkpoint
from nemotron3.model.nemotron import NemotronHForCausalLM


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[n], sb[n]) for n in sa)


def test_preset_is_seeded_ready_and_in_eval_mode():
    a = nemotron3.load_model("tiny", seed=1)
    assert isinstance(a, NemotronHForCausalLM) and not a.training
    assert all(t.device.type == "cpu" for t in a.state_dict().values())
    assert states_equal(a, nemotron3.load_model("tiny", seed=1, device=torch.device("cpu")))
    assert not states_equal(a, nemotron3.load_model("tiny", seed=2))
    assert a.config == preset("tiny")
    ids = torch.randint(0, a.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    out = a(ids)
    logits = getattr(out, "logits", out)
    assert logits.shape == (2, 5, a.config.vocab_size) and torch.isfinite(logits).all()


def test_preset_dtype_keeps_fp32_tensors():
    m = nemotron3.load_model("tiny", dtype=torch.bfloat16)
    assert m.backbone.embeddings.weight.dtype == torch.bfloat16
    assert m.backbone.layers[1].mixer.gate.e_score_correction_bias.dtype == torch.float32
    assert m.backbone.layers[0].mixer.dt_bias.dtype == torch.float32


def test_directory_round_trip_and_dt_clamp(tmp_path):
    m = nemotron3.load_model("tiny", seed=5)
    nemotron3.save_checkpoint(m, m.config, tmp_path)
    again = nemotron3.load_model(tmp_path)
    assert states_equal(m, again) and not again.training
    assert again.config.dt_clamp == "checkpoint"
    assert nemotron3.load_model(str(tmp_path), dt_clamp="transformers").config.dt_clamp == "transformers"
    assert nemotron3.load_model("tiny", dt_clamp="transformers").config.dt_clamp == "transformers"


def test_directory_load_builds_on_meta_and_assigns(tmp_path, monkeypatch):
    """The loaded tensors become the parameters (assign=True): nothing is allocated twice."""
    m = nemotron3.load_model("tiny")
    nemotron3.save_checkpoint(m, m.config, tmp_path)
    produced: dict[str, torch.Tensor] = {}
    real_read = checkpoint.read_state

    def spy(*args, **kwargs):
        produced.update(real_read(*args, **kwargs))
        return produced

    monkeypatch.setattr("nemotron3.loader.read_state", spy)
    again = nemotron3.load_model(tmp_path)
    for name, t in again.state_dict().items():
        assert t.data_ptr() == produced[name].data_ptr(), name


def test_memory_check_for_presets(monkeypatch):
    monkeypatch.setattr(checkpoint, "available_memory", lambda: 64 << 30)
    with pytest.raises(MemoryError, match=r"ultra-550b-a55b.*needs 1044\.06 GiB .* only 64\.00 GiB"):
        nemotron3.load_model("ultra-550b-a55b", dtype=torch.bfloat16)


def test_available_memory_probe_is_positive():
    assert checkpoint.available_memory() > 0


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="neither a checkpoint directory nor a preset") as err:
        nemotron3.load_model(tmp_path / "nowhere")
    assert "nowhere" in str(err.value) and all(name in str(err.value) for name in PRESETS)
    preset("tiny").to_json(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        nemotron3.load_model(tmp_path)
    with pytest.raises(ValueError, match="dt_clamp"):
        nemotron3.load_model("tiny", dt_clamp="never")


def test_seeded_preset_is_the_same_model_in_every_dtype():
    full = nemotron3.load_model("tiny", seed=4)
    low = nemotron3.load_model("tiny", seed=4, dtype=torch.bfloat16)
    for (name, a), b in zip(full.state_dict().items(), low.state_dict().values()):
        assert torch.equal(a.to(b.dtype), b), name
