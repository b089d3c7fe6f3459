"""Multi-process training with torch.distributed: FSDP2 for the dense weights, expert parallelism for MoE.

Nothing here implements its own communication: process groups come from `torch.distributed`, dense
weights are sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`) and routed tokens travel with
`all_to_all_single` (the autograd-aware one from `torch.distributed.nn.functional` for activations,
so gradients flow back to the rank that sent each token). See docs/distributed.md.

    info = init_distributed()                       # torchrun env → process group (nccl on GPU, else gloo)
    model = NemotronHForCausalLM(cfg); model.init_weights(torch.Generator().manual_seed(0))  # same on every rank
    shard_model(model, info)                        # experts split across ranks, the rest FSDP2-sharded
    ... loss.backward(); optimizer.step() ...       # loss = mean over this rank's share of the global batch
    state = gather_full_state_dict(model)           # every rank calls; rank 0 gets the full state dict

Gradient convention: every rank's loss is the mean over its own (equal-sized) share of the global batch,
so the global loss is the mean of the per-rank losses. FSDP averages the dense gradients across ranks;
an expert's gradient arrives summed over all ranks' tokens through the all-to-all backward, so
`shard_model` scales expert gradients by 1/world_size. Both then equal the gradient of the global loss.
"""

from __future__ import annotations

import gc
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nemotron3.model.mlp import relu2
from nemotron3.model.moe import Experts, MoE


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank / world size, its device, and whether it is rank 0."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    The backend is nccl when CUDA is available, else gloo (override with `backend`). Without torchrun's
    variables this is a no-op: rank 0 of 1 on cuda:0 or cpu, no process group. Calling it again once the
    group exists just describes it.
    """
    if dist.is_available() and dist.is_initialized():
        return _describe(dist.get_backend())
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return DistInfo(device=device)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device)
    else:
        dist.init_process_group(backend)
    return _describe(backend)


def _describe(backend: str) -> DistInfo:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def destroy_distributed() -> None:
    """Leave the process group if one exists: call it once, at the very end, after the sharded model and its
    optimizer are gone (e.g. once the function holding them has returned).

    It collects garbage and waits for every rank first. Destroying the groups while a sharded model (which
    holds group handles) is still alive and freeing it afterwards made ~1 in 7 gloo runs abort at
    interpreter exit ("terminate called without an active exception", SIGABRT) in torch 2.13.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def _all_to_all_rows(
    rows: torch.Tensor, recv_splits: list[int], send_splits: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Autograd-aware variable-size all-to-all along dim 0: send_splits[j] rows to rank j, recv_splits[j] from it."""
    out = rows.new_empty(sum(recv_splits), *rows.shape[1:])
    with warnings.catch_warnings():  # deprecated in favour of the private _functional_collectives variant
        warnings.simplefilter("ignore", FutureWarning)
        from torch.distributed.nn.functional import all_to_all_single

        return all_to_all_single(out, rows.contiguous(), recv_splits, send_splits, group=group or dist.group.WORLD)


class ExpertParallelExperts(nn.Module):
    """This rank's contiguous slice of the routed experts; tokens reach them by all-to-all.

    Rank r of W holds experts [r·E/W, (r+1)·E/W) as up_proj [E/W, F, L] and down_proj [E/W, L, F], the
    same names and layout as `moe.Experts`, so `forward` is a drop-in replacement with the same result.
    `grad_scale` multiplies the expert gradients (shard_model sets 1/W; see the module docstring).
    """

    def __init__(
        self,
        num_experts: int,
        in_size: int,
        intermediate_size: int,
        group: dist.ProcessGroup | None = None,
        grad_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        else:
            self.world_size, self.rank = 1, 0
        if num_experts % self.world_size:
            raise ValueError(
                f"n_routed_experts ({num_experts}) must be a multiple of the expert-parallel size ({self.world_size})"
            )
        self.num_experts = num_experts
        self.num_local = num_experts // self.world_size
        self.first_expert = self.rank * self.num_local
        self.up_proj = nn.Parameter(torch.empty(self.num_local, intermediate_size, in_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_local, in_size, intermediate_size))
        self.grad_scale = grad_scale
        if grad_scale != 1.0:
            for p in (self.up_proj, self.down_proj):
                p.register_hook(lambda g: g * self.grad_scale)

    @classmethod
    def from_experts(
        cls, experts: Experts, group: dist.ProcessGroup | None = None, grad_scale: float = 1.0
    ) -> ExpertParallelExperts:
        """Take this rank's slice of a full `Experts` (identical on every rank → the same function)."""
        E, F_, L = experts.up_proj.shape
        ep = cls(E, L, F_, group=group, grad_scale=grad_scale)
        sl = slice(ep.first_expert, ep.first_expert + ep.num_local)
        with torch.no_grad():
            ep.up_proj.data = experts.up_proj.data[sl].clone()
            ep.down_proj.data = experts.down_proj.data[sl].clone()
        return ep

    def extra_repr(self) -> str:
        return f"experts {self.first_expert}..{self.first_expert + self.num_local - 1} of {self.num_experts}"

    def _local_experts(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """rows [N, L] grouped by local expert (counts[e] rows each) → [N, L], relu² MLP per expert."""
        outs = []
        start = 0
        for e, n in enumerate(counts):
            if n:
                seg = rows[start : start + n]
                up, down = self.up_proj[e].to(seg.dtype), self.down_proj[e].to(seg.dtype)
                outs.append(F.linear(relu2(F.linear(seg, up)), down))
                start += n
        if not outs:  # no token for any local expert: keep the weights in the graph so they get zero gradients
            return rows + 0.0 * (self.up_proj.sum() + self.down_proj.sum()).to(rows.dtype)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Σ_j w_j · down_e(relu(up_e(x))²) over each token's experts, accumulated in fp32 (as `Experts`).

        x: [T, L]; weights: [T, k] fp32; indices: [T, k] global expert ids. Returns [T, L] float32.
        """
        T, k = indices.shape
        W, El = self.world_size, self.num_local
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert, hence by owning rank
        token = order // k
        send_counts = torch.bincount(flat, minlength=self.num_experts)  # [E]
        xs = x[token]
        if W == 1:
            ys = self._local_experts(xs, send_counts.tolist())
        else:
            # recv_counts[s, e]: rows rank s sends to my local expert e (chunk j of send_counts goes to rank j)
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
            recv_counts = recv_counts.view(W, El)
            send_splits = send_counts.view(W, El).sum(1).tolist()
            recv_splits = recv_counts.sum(1).tolist()
            recv = _all_to_all_rows(xs, recv_splits, send_splits, self.group)  # [N, L] by (source, expert)
            local_id = torch.arange(El, device=x.device).repeat(W).repeat_interleave(recv_counts.reshape(-1))
            perm = local_id.argsort(stable=True)  # regroup by local expert, keeping each source's order
            done = self._local_experts(recv[perm], recv_counts.sum(0).tolist())
            back = done[perm.argsort()]  # arrival order again
            ys = _all_to_all_rows(back, send_splits, recv_splits, self.group)
        out = x.new_zeros(T, x.shape[-1], dtype=torch.float32)
        out.index_add_(0, token, ys.float() * weights.reshape(-1)[order, None])
        return out


def expert_parallel_modules(model: nn.Module) -> list[tuple[str, ExpertParallelExperts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertParallelExperts)]


def shard_model(
    model: nn.Module,
    dist_info: DistInfo,
    expert_parallel: bool = True,
    reduce_dtype: torch.dtype | None = torch.float32,
    mp_param_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard a (fully initialised, identical on every rank) NemotronHForCausalLM in place and return it.

    expert_parallel: every MoE's `experts` becomes an ExpertParallelExperts holding this rank's E/W
        experts (expert-parallel size = world size). They are excluded from FSDP (`ignored_params`): each
        rank owns its experts, so their gradients need no data-parallel reduction, only the 1/W scale.
        With expert_parallel=False the stacked experts are FSDP-sharded like any other weight.
    FSDP2: `fully_shard` on every backbone Block, on the MTP stack as one unit, and at the root (embeddings, norm_f, lm_head),
        with MixedPrecisionPolicy(param_dtype=mp_param_dtype, reduce_dtype=reduce_dtype): fp32 gradient
        reduction by default, torch.bfloat16 to halve the traffic.
    Single process (not distributed): returns the model unchanged.
    """
    if not dist_info.distributed:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from nemotron3.model.block import Block

    W = dist_info.world_size
    ignored: set[nn.Parameter] = set()
    if expert_parallel:
        ep_group = dist.new_group(list(range(W)))  # own communicator: EP traffic never interleaves with FSDP's
        for moe in [m for m in model.modules() if isinstance(m, MoE)]:
            moe.experts = ExpertParallelExperts.from_experts(moe.experts, group=ep_group, grad_scale=1.0 / W)
            moe.experts.to(dist_info.device)
            ignored.update(moe.experts.parameters())
    mp = MixedPrecisionPolicy(param_dtype=mp_param_dtype, reduce_dtype=reduce_dtype)
    for block in [m for m in model.backbone.layers if isinstance(m, Block)]:
        fully_shard(block, mp_policy=mp, ignored_params=ignored, reshard_after_forward=reshard_after_forward)
    if getattr(model, "mtp", None) is not None:  # one unit: MTP.forward calls enorm/hnorm/eh_proj of its
        # first layer directly (outside that layer's forward), so per-layer units would stay sharded there
        fully_shard(model.mtp, mp_policy=mp, ignored_params=ignored, reshard_after_forward=reshard_after_forward)
    # fully_shard moves the managed parameters and the buffers to the mesh's device (cuda:LOCAL_RANK / cpu)
    fully_shard(model, mp_policy=mp, ignored_params=ignored, reshard_after_forward=reshard_after_forward)
    return model


def sync_expert_load(counts: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Global per-expert token counts [E] (or [layers, E]): the sum over ranks of each rank's own counts.

    Every rank must update the router's `e_score_correction_bias` from these global counts (aux-loss-free
    balancing), so the bias, which decides routing, stays identical everywhere. Returns a new tensor.
    """
    total = counts.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def buffers_in_sync(model: nn.Module) -> bool:
    """True when every floating buffer (router correction biases, ...) is bitwise equal on all ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    ok = torch.ones(1)
    for _, buf in model.named_buffers():
        if buf.is_floating_point() and buf.numel():
            low, high = buf.detach().float().clone(), buf.detach().float().clone()
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            ok *= float(torch.equal(low, high))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def gather_full_state_dict(model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU, experts stacked back to [E, …]: the normal (save_checkpoint) names.

    A collective: every rank must call it. Returns the dict on rank 0 ({} elsewhere unless rank0_only=False).
    """
    from torch.distributed.tensor import DTensor

    ep = {f"{name}.{p}": mod for name, mod in expert_parallel_modules(model) for p in ("up_proj", "down_proj")}
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    keep = not rank0_only or rank == 0
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        elif name in ep and ep[name].world_size > 1:
            mod = ep[name]
            parts = [torch.empty_like(tensor) for _ in range(mod.world_size)]
            dist.all_gather(parts, tensor.detach().contiguous(), group=mod.group)
            tensor = torch.cat(parts)
        if keep:
            out[name] = tensor.detach().cpu().clone()
    return out


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global L2 gradient norm of a sharded model, then scale gradients to at most `max_norm` (as torch's).

    FSDP gradients are DTensor shards and expert-parallel gradients belong to one rank each, so the global
    norm² is the all-reduced sum of every rank's local squares (other plain gradients are replicated and
    counted once, on rank 0). Every rank must call it. Returns the norm before clipping (float32 scalar).
    """
    from torch.distributed.tensor import DTensor

    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    owned = {id(p) for _, m in expert_parallel_modules(model) for p in m.parameters()}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for p in model.parameters():
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor):
            sq += p.grad.to_local().float().square().sum()
        elif not distributed or id(p) in owned or rank == 0:
            sq += p.grad.float().square().sum()
    if distributed:
        dist.all_reduce(sq)
    norm = sq.sqrt()
    coef = min(1.0, max_norm / (norm.item() + 1e-6))
    for g in grads:
        g.mul_(coef)
    return norm
