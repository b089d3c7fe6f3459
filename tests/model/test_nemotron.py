"""Model-level behaviour not covered by HF parity: bf16, MTP block, init, input validation."""

import pytest
import torch

from nemotron3.config import preset
from nemotron3.model import NemotronHForCausalLM
from nemotron3.model.nemotron import FP32_TENSORS


def tiny_model(seed: int = 0) -> NemotronHForCausalLM:
    model = NemotronHForCausalLM(preset("tiny"))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval()


@torch.no_grad()
def test_bf16_close_to_fp32_and_keeps_small_tensors_fp32():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    low = tiny_model().to_dtype(torch.bfloat16)
    out = low(ids).logits
    # bf16 has 8 mantissa bits (rel. rounding 2^-9 ≈ 2e-3 per op); over ~6 layers the logits drift ~1e-2.
    assert ((out - ref).norm() / ref.norm()).item() < 3e-2
    for name, t in [*low.named_parameters(), *low.named_buffers()]:
        want = torch.float32 if name.rsplit(".", 1)[-1] in FP32_TENSORS else torch.bfloat16
        assert t.dtype == want, name
    cache = low.new_cache(2)
    assert cache.layers[0].ssm.dtype == torch.float32  # SSM state is float32 in every model dtype
    steps = [low(ids[:, :20], cache=cache).logits] + [low(ids[:, t : t + 1], cache=cache).logits for t in range(20, 33)]
    # the decode and prefill paths round differently in bf16 (architecture.md §11): allow bf16-level drift
    assert ((torch.cat(steps, 1) - out).norm() / out.norm()).item() < 1e-2


@torch.no_grad()
def test_mtp_block_drafts_from_hidden_state_and_next_token():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    out = model(ids)
    assert out.hidden_states.shape == (1, 12, 64) and out.logits.shape == (1, 12, 256)
    draft = model.mtp(out.hidden_states[:, :-1], model.backbone.embeddings(ids[:, 1:]))
    assert draft.shape == (1, 11, 64)
    # causal: the draft at position i depends only on positions ≤ i
    part = model.mtp(out.hidden_states[:, :5], model.backbone.embeddings(ids[:, 1:6]))
    torch.testing.assert_close(part, draft[:, :5], rtol=1e-5, atol=1e-5)
    # the MTP block's names are the hub's (architecture.md §9.2 / §10.1)
    names = {n for n, _ in model.named_parameters() if n.startswith("mtp.")}
    assert {"mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.0.eh_proj.weight",
            "mtp.layers.0.mixer.q_proj.weight", "mtp.layers.1.mixer.gate.weight",
            "mtp.layers.1.final_layernorm.weight", "mtp.layers.1.mixer.experts.up_proj"} <= names  # fmt: skip


@torch.no_grad()
def test_logits_to_keep_and_init_is_seeded():
    a, b = tiny_model(seed=5), tiny_model(seed=5)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    ids = torch.randint(0, 256, (2, 9))
    full = a(ids).logits
    torch.testing.assert_close(a(ids, logits_to_keep=1).logits, full[:, -1:], rtol=1e-6, atol=1e-6)  # GEMV vs GEMM rounding


def test_bad_input_ids_are_named():
    model = tiny_model()
    with pytest.raises(ValueError, match="input_ids out of range"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(torch.tensor([1, 2]))
