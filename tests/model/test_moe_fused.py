"""MoE.fuse_projections: one storage for the matrices that share an input; same outputs, same parameters.

Fused and unfused forwards are both float32 and differ only in summation order (the shared-expert and
latent-up outputs are summed inside one GEMV instead of after two): measured ≤ 2e-7 relative L2; we allow 2e-6.
"""

from __future__ import annotations

import pytest
import torch

from nemotron3.model.fused import fast_path
from nemotron3.model.moe import MoE
from tests.model.helpers import small_config
from tests.model.test_kernels import assert_close_rel


def _moe(seed: int = 0, latent: int | None = 16) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(small_config("E", moe_latent_size=latent))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        moe.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    return moe.eval()


@pytest.mark.parametrize("latent", [16, None])  # LatentMoE; Nano's experts on the hidden state itself
@pytest.mark.parametrize("tokens", [5, 40])  # decode-sized (one native call) and prefill-sized (dispatch, GEMMs)
def test_fused_forward_matches_and_parameters_are_unchanged(latent, tokens):
    moe = _moe(latent=latent)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    x = torch.randn(2, tokens, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = moe(x)
    assert moe.fuse_projections()
    after = moe.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.inference_mode(), fast_path():
        fused = moe(x)
    with torch.inference_mode():  # outside the engine's fast path: the reference op sequence, on views of the fused
        # storage; the BLAS may pick other kernels for them (bit-identical on the Intel VM, ≤ 1.5e-7 relative L2 on
        # the AMD EPYC one)
        assert_close_rel(moe(x), ref.double(), 1e-6, "unfused op sequence on fused storage")
    assert_close_rel(fused, ref.double(), 2e-6, "fused MoE")


def test_fused_storage_follows_in_place_updates_and_steps_aside_for_autograd_and_new_tensors():
    moe = _moe()
    moe.fuse_projections()
    x = torch.randn(3, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), fast_path():
        moe.shared_experts.up_proj.weight.mul_(2.0)  # in place: the fused storage sees it
        assert moe._fused_forward(x) is not None
    fresh = _moe()
    fresh.shared_experts.up_proj.weight.data.mul_(2.0)
    with torch.inference_mode(), fast_path():
        assert_close_rel(moe(x[None])[0], fresh(x[None])[0].double(), 2e-6, "after an in-place update")
    with fast_path():
        assert moe._fused_forward(x) is None  # grad mode on here: the unfused path keeps autograd exact
    with torch.no_grad(), fast_path():
        moe.fc1_latent_proj.weight = torch.nn.Parameter(moe.fc1_latent_proj.weight.detach().clone())
        assert moe._fused_forward(x) is None  # a replaced parameter: the fused storage is stale, not used
