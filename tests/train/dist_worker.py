"""torchrun worker for tests/train/test_distributed.py (also importable: the single-process reference
uses the same model, batches and training step).

    python -m torch.distributed.run --nproc_per_node 2 tests/train/dist_worker.py OUT_DIR

Rank 0 writes OUT_DIR/result.json (per-step global losses, expert-parallel vs Experts differences, ...)
OUT_DIR/state.pt (the gathered full state dict after training) and OUT_DIR/grads.pt (the full gradients
of the first step, before clipping).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nemotron3.config import preset
from nemotron3.model.moe import Experts, MoE
from nemotron3.model.nemotron import NemotronHForCausalLM
from nemotron3.train.distributed import (
    ExpertParallelExperts,
    buffers_in_sync,
    clip_grad_norm_,
    destroy_distributed,
    gather_full_state_dict,
    init_distributed,
    shard_model,
    sync_expert_load,
)

STEPS, GLOBAL_BATCH, SEQ, LR, MAX_NORM = 5, 4, 32, 1e-2, 1.0


def make_model() -> NemotronHForCausalLM:
    """The `tiny` preset (M, E, *, -, LatentMoE with 8 experts, an MTP block), identical on every rank."""
    model = NemotronHForCausalLM(preset("tiny"))
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def make_batches(vocab_size: int) -> list[torch.Tensor]:
    """Two fixed random global batches [B, S], alternated, so that the loss visibly falls (memorisation)."""
    g = torch.Generator().manual_seed(1)
    fixed = [torch.randint(0, vocab_size, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(2)]
    return [fixed[i % 2] for i in range(STEPS)]


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of logits[:, :-1] against ids[:, 1:]."""
    logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train(
    model: torch.nn.Module, batches: list[torch.Tensor], rank: int, world: int, on_first_grads=None
) -> tuple[list[float], list[float]]:
    """AdamW steps with gradient clipping; rank r trains on rows [r·B/W, (r+1)·B/W) of each global batch.

    Returns the global losses and the global gradient norms (before clipping). `on_first_grads(model)` is
    called once, after the first backward. world == 1 clips with torch's own clip_grad_norm_ (the reference).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, foreach=False)
    per = GLOBAL_BATCH // world
    trace, norms = [], []
    for step, ids in enumerate(batches):
        loss = lm_loss(model, ids[rank * per : (rank + 1) * per])
        loss.backward()
        if step == 0 and on_first_grads is not None:
            on_first_grads(model)
        if world > 1:
            norms.append(clip_grad_norm_(model, MAX_NORM).item())
        else:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen = loss.detach().clone()
        if world > 1:
            dist.all_reduce(seen)
            seen /= world
        trace.append(seen.item())
    return trace, norms


def gather_full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full gradient on every rank (FSDP shards all-gathered, experts re-stacked)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad
        if isinstance(g, DTensor):
            g = g.full_tensor()
        elif name.endswith(("experts.up_proj", "experts.down_proj")):
            parts = [torch.empty_like(g) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, g.contiguous())
            g = torch.cat(parts)
        out[name] = g.detach().clone()
    return out


def _rel_diff(a: torch.Tensor | None, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (inf when `a` is missing, e.g. a gradient that never arrived)."""
    if a is None:
        return float("inf")
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def check_expert_parallel(rank: int, world: int, skew: bool) -> dict[str, float]:
    """ExpertParallelExperts vs Experts on this rank's tokens: outputs, input grads, weight grads.

    skew=True routes every token to rank 0's experts, so rank 1 receives no rows at all.
    """
    E, L, Fi, T, k = 8, 16, 24, 40, 2
    full = Experts(E, L, Fi)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        full.up_proj.normal_(0, 0.3, generator=g)
        full.down_proj.normal_(0, 0.3, generator=g)
    ep = ExpertParallelExperts.from_experts(full)
    g = torch.Generator().manual_seed(100 + rank)  # different tokens on every rank
    x = torch.randn(T, L, generator=g)
    scores = torch.rand(T, E, generator=g)
    if skew:
        scores[:, E // world :] -= 2.0
    weights, indices = scores.topk(k, dim=-1)
    upstream = torch.randn(T, L, generator=g)

    x_ep, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ep = ep(x_ep, weights, indices)
    out_ref = full(x_ref, weights, indices)
    (out_ep * upstream).sum().backward()
    (out_ref * upstream).sum().backward()
    # the global objective is Σ_ranks; a rank's experts collect gradient from every rank's tokens
    ref_up, ref_down = full.up_proj.grad.clone(), full.down_proj.grad.clone()
    dist.all_reduce(ref_up)
    dist.all_reduce(ref_down)
    sl = slice(ep.first_expert, ep.first_expert + ep.num_local)
    res = {
        "out": _rel_diff(out_ep, out_ref),
        "x_grad": _rel_diff(x_ep.grad, x_ref.grad),
        "up_grad": _rel_diff(ep.up_proj.grad, ref_up[sl]),
        "down_grad": _rel_diff(ep.down_proj.grad, ref_down[sl]),
        "not_fp32": float(out_ep.dtype != torch.float32),
        "no_grad": float(ep.up_proj.grad is None or ep.down_proj.grad is None),
    }
    t = torch.tensor([v for v in res.values()])  # worst case over ranks
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(res, t.tolist()))


def run_sharded(info, reduce_dtype: torch.dtype, on_first_grads=None, param_dtype: torch.dtype | None = None):
    model = shard_model(make_model(), info, reduce_dtype=reduce_dtype, mp_param_dtype=param_dtype)
    trace, norms = train(model, make_batches(model.config.vocab_size), info.rank, info.world_size, on_first_grads)
    return trace, norms, model


def main(out_dir: Path) -> None:
    info = init_distributed()
    run_checks(info, out_dir)
    # only on success (a rank that raised exits and torchrun stops the others; a barrier here would hang),
    # and after run_checks returned, so that its sharded models are already freed
    destroy_distributed()


def run_checks(info, out_dir: Path) -> None:
    assert info.distributed and info.backend == "gloo", info
    result: dict = {"world_size": info.world_size}
    result["ep_vs_experts"] = check_expert_parallel(info.rank, info.world_size, skew=False)
    result["ep_vs_experts_skewed"] = check_expert_parallel(info.rank, info.world_size, skew=True)

    first_grads = {}
    trace, norms, model = run_sharded(info, torch.float32, lambda m: first_grads.update(gather_full_grads(m)))
    result["trace_fp32"], result["grad_norms_fp32"] = trace, norms
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    result["local_experts"] = [m.experts.num_local for m in moes]
    result["experts_are_ep"] = all(isinstance(m.experts, ExpertParallelExperts) for m in moes)
    dense = model.lm_head.weight
    result["dense_is_dtensor"] = type(dense).__name__ == "DTensor"
    result["dense_local_rows"] = dense.to_local().shape[0] if result["dense_is_dtensor"] else None
    # aux-loss-free balancing: global counts from each rank's own routing, the same update everywhere
    ids = make_batches(model.config.vocab_size)[0]
    per = GLOBAL_BATCH // info.world_size
    routed = []
    hook = moes[0].gate.register_forward_hook(lambda mod, args, out: routed.append(out[1]))
    with torch.no_grad():
        model(ids[info.rank * per : (info.rank + 1) * per])
    hook.remove()
    idx = routed[0]
    local = torch.bincount(idx.reshape(-1), minlength=moes[0].gate.e_score_correction_bias.numel())
    total = sync_expert_load(local)
    result["load_local_sum"], result["load_total_sum"] = int(local.sum()), int(total.sum())
    bias = moes[0].gate.e_score_correction_bias
    bias += 1e-3 * torch.sign(total.float().mean() - total.float())
    result["buffers_in_sync"] = buffers_in_sync(model)

    state = gather_full_state_dict(model)
    result["trace_bf16_reduce"], result["grad_norms_bf16_reduce"], _ = run_sharded(info, torch.bfloat16)
    result["trace_bf16_params"], _, _ = run_sharded(info, torch.float32, param_dtype=torch.bfloat16)
    if info.is_main:
        torch.save(state, out_dir / "state.pt")
        torch.save(first_grads, out_dir / "grads.pt")
        (out_dir / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
