"""`nemotron3 train rl`: GRPO-style reinforcement learning with verifiable rewards (RLVR), first version.

One step (synchronous, on-policy):

1. Prompts. ``rollout.prompts_per_step`` fresh task instances (nemotron3.train.tasks), cycling through
   ``rollout.domains``; step s draws them from seed ``rollout.seed · 1_000_003 + s`` (never repeated), and
   renders each with the chat template and its generation prompt (nemotron3.train.evaluate.task_prompt).
2. Rollouts. Our own engine (`LLM` built once around the *trained* nn.Module, so it always samples from the
   current weights; the engine puts the model in eval mode) samples ``rollout.group_size`` completions per
   prompt (SamplingParams n = G, per-request seed, temperature, max_tokens).
3. Rewards. ``verify(instance, text)`` → 1.0 / 0.0 (exact-match checkers); a custom ``reward_fn(instance,
   text, token_ids) -> float`` can be passed to `RLTrainer` (the tests script one).
4. Advantages. `group_advantages` over the G completions of each prompt (GRPO; ``grpo.normalize_std:
   false`` gives Dr. GRPO). A group whose rewards are all equal has advantage 0: it contributes no policy
   gradient (only the KL term, if any).
5. Update (model.train()). Prompt + completion are teacher-forced in one right-padded batch; the log-prob
   of each sampled token (logits / temperature, the distribution it was sampled from) is gathered; the mask
   keeps completion tokens only. ``old_logprobs`` are those same values detached, computed once per batch:
   with ``grpo.ppo_epochs: 1`` (the default) the update is exactly on-policy and the importance ratio is 1
   (the clip only matters from the second epoch on, when ``ppo_epochs`` > 1 re-uses the batch against the
   fixed old log-probs). ``ref_logprobs`` come from a frozen copy of the initial model when
   ``grpo.kl_coef`` > 0 (k3 estimator). Optionally (``grpo.tis_cap``) the engine's own log-probs of the
   sampled tokens are the behaviour policy and each token is weighted by the truncated importance weight
   min(π_train / π_engine, cap) — the off-policy correction for engine/trainer numerical mismatch.
   Loss: `grpo_loss` (clip_eps / clip_eps_high, token-mean or seq-mean). The optimizer is a plain AdamW
   (no weight decay by default) with linear warm-up and gradient clipping; not the Pretrainer loop (no
   micro-batching, spike guard or MoE bias updates: the whole P·G batch is one forward).

Metrics per step go to ``run.out_dir/metrics.jsonl``: mean reward, accuracy (fraction of completions with
reward ≥ 1), mean completion length, loss, kl, clip_frac, ratio_mean, grad_norm, the fraction of groups with
zero variance, and seconds spent in rollout / update. The final model is exported in the nemotron_h format
(`save_checkpoint`) with the tokenizer files copied next to it. Not implemented yet: asynchronous rollouts,
resumable training checkpoints, micro-batching, multi-turn tool environments.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nemotron3.default_model import resolve_model
from nemotron3.engine.llm import LLM
from nemotron3.engine.sampling_params import SamplingParams
from nemotron3.io.checkpoint import save_checkpoint
from nemotron3.io.tokenizer import Tokenizer
from nemotron3.model.nemotron import keeps_fp32
from nemotron3.train.config import Recipe
from nemotron3.train.evaluate import task_prompt
from nemotron3.train.objectives import LOSS_AGGREGATIONS, group_advantages, grpo_loss, truncated_importance_weights
from nemotron3.train.tasks import DOMAINS, TaskInstance, generate, verify
from nemotron3.train.tokenizer import PAD_ID

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RewardFn = Callable[[TaskInstance, str, Sequence[int]], float]

# ------------------------------------------------------------------------------------------ recipe


@dataclass
class RLModelSection:
    init_from: str = "default"  # the policy's starting checkpoint: a nemotron_h directory or "default"
    tokenizer: str | None = None  # a tokenizer directory; None: the checkpoint's


@dataclass
class RolloutSection:
    domains: list[str] = field(default_factory=lambda: ["arithmetic", "sorting", "tool_use", "retrieval"])
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-domain generator options
    prompts_per_step: int = 8  # P: prompts per step
    group_size: int = 8  # G: completions sampled per prompt
    temperature: float = 1.0
    max_tokens: int = 256  # per completion (a truncated one is simply scored as it stands)
    seed: int = 2  # task instances of step s come from seed · 1_000_003 + s; sampling seeds from run.seed
    kv_cache_memory_bytes: int = 256 << 20  # the engine's cache budget


@dataclass
class GRPOSection:
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # DAPO clip-higher; None = clip_eps
    kl_coef: float = 0.0  # β of the k3 KL to the frozen initial model; 0 = no reference model
    loss_agg: str = "token-mean"  # or "seq-mean"
    normalize_std: bool = True  # GRPO; false = Dr. GRPO (no std division)
    ppo_epochs: int = 1  # updates per rollout batch (old log-probs fixed); 1 = on-policy, ratio 1
    tis_cap: float | None = None  # truncated importance weights vs the engine's log-probs (temperature 1 only)


@dataclass
class RLOptimSection:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables
    warmup_steps: int = 0  # linear warm-up, then constant


@dataclass
class RLRunSection:
    steps: int = 20
    out_dir: str = "runs/rl"
    log_every: int = 1
    seed: int = 0
    threads: int = 0
    export_dir: str | None = None  # default out_dir/model
    export_dtype: str = "float32"  # float32 | bfloat16


@dataclass
class RLConfig(Recipe):
    model: RLModelSection = field(default_factory=RLModelSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    optim: RLOptimSection = field(default_factory=RLOptimSection)
    run: RLRunSection = field(default_factory=RLRunSection)

    def validate(self) -> None:
        r, g, o, run = self.rollout, self.grpo, self.optim, self.run
        checks = [
            (bool(r.domains) and all(d in DOMAINS for d in r.domains),
             f"rollout.domains must be a non-empty list of {list(DOMAINS)}, got {r.domains}"),
            (set(r.task_options) <= set(DOMAINS), f"rollout.task_options keys must be domains of {list(DOMAINS)}"),
            (r.prompts_per_step >= 1, "rollout.prompts_per_step must be >= 1"),
            (r.group_size >= 2, "rollout.group_size must be >= 2 (a group of one has no relative advantage)"),
            (r.temperature > 0, "rollout.temperature must be > 0 (GRPO samples; greedy groups are identical)"),
            (r.max_tokens >= 1, "rollout.max_tokens must be >= 1"),
            (g.clip_eps >= 0 and (g.clip_eps_high is None or g.clip_eps_high >= 0),
             "grpo.clip_eps and grpo.clip_eps_high must be >= 0"),
            (g.kl_coef >= 0, "grpo.kl_coef must be >= 0"),
            (g.loss_agg in LOSS_AGGREGATIONS, f"grpo.loss_agg must be one of {list(LOSS_AGGREGATIONS)}"),
            (g.ppo_epochs >= 1, "grpo.ppo_epochs must be >= 1"),
            (g.tis_cap is None or g.tis_cap > 0, "grpo.tis_cap must be > 0 or null"),
            (g.tis_cap is None or r.temperature == 1.0,
             "grpo.tis_cap needs rollout.temperature 1 (the engine reports raw-distribution log-probs)"),
            (o.lr > 0, "optim.lr must be > 0"),
            (o.weight_decay >= 0, "optim.weight_decay must be >= 0"),
            (o.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables)"),
            (o.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
            (run.steps >= 1, "run.steps must be >= 1"),
            (run.log_every >= 1, "run.log_every must be >= 1"),
            (run.export_dtype in DTYPES, "run.export_dtype must be 'float32' or 'bfloat16'"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid recipe: {message}")


# ------------------------------------------------------------------------------------------ pieces


def verifiable_reward(instance: TaskInstance, text: str, token_ids: Sequence[int] = ()) -> float:
    """The default reward: 1.0 if the domain's exact-match checker accepts the completion, else 0.0."""
    return 1.0 if verify(instance, text) else 0.0


def step_instances(cfg: RLConfig, step: int) -> list[TaskInstance]:
    """The P fresh prompts of `step`, cycling through rollout.domains (a repeated domain gets more)."""
    r = cfg.rollout
    cycle = [r.domains[i % len(r.domains)] for i in range(r.prompts_per_step)]
    seed = r.seed * 1_000_003 + step
    pools = {d: iter(generate(d, cycle.count(d), seed, **r.task_options.get(d, {}))) for d in dict.fromkeys(cycle)}
    return [next(pools[d]) for d in cycle]


def pad_sequences(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int = PAD_ID
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, L] ids of prompt + completion, and the [B, L - 1] mask of the positions t whose
    next token ids[t + 1] is a completion token (the sampled tokens whose log-probs are trained)."""
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length - 1))
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, : len(p) + len(c)] = torch.tensor([*p, *c], dtype=torch.long)
        mask[i, len(p) - 1 : len(p) + len(c) - 1] = 1.0
    return ids, mask


def sequence_logprobs(model: torch.nn.Module, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B, L - 1]: log π(ids[t + 1] | ids[≤ t]) under the model with logits / temperature (teacher-forced).
    Right padding never reaches an earlier position (causal attention, forward-only Mamba scan)."""
    logits = model(ids).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


@dataclass
class Rollouts:
    instances: list[TaskInstance]  # P
    prompt_ids: list[list[int]]  # B = P · G, each prompt repeated G times
    completion_ids: list[list[int]]  # B
    texts: list[str]  # B
    rewards: torch.Tensor  # [P, G]
    engine_logprobs: list[list[float]] | None  # B, when asked (grpo.tis_cap)


# ------------------------------------------------------------------------------------------ trainer


class RLTrainer:
    """GRPO on the current policy's own rollouts: `RLTrainer(cfg).run()` (see the module docstring)."""

    def __init__(self, config: RLConfig, *, reward_fn: RewardFn | None = None, progress: bool = True) -> None:
        if not isinstance(config, RLConfig):
            raise TypeError("RLTrainer takes an RLConfig (RLConfig.from_file / from_dict)")
        from nemotron3.loader import load_model

        self.cfg = config
        self.reward_fn = reward_fn or verifiable_reward
        self.progress = progress
        self.out = Path(config.run.out_dir)
        if config.run.threads > 0:
            torch.set_num_threads(config.run.threads)
        torch.manual_seed(config.run.seed)
        model_dir = resolve_model(config.model.init_from)
        self.tokenizer_dir = Path(config.model.tokenizer or model_dir).expanduser()
        self.tokenizer = Tokenizer.from_dir(self.tokenizer_dir)
        self.model = load_model(model_dir, dtype=torch.float32)
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.reference = None
        if config.grpo.kl_coef > 0:
            self.reference = copy.deepcopy(self.model).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        o = config.optim
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
        )  # fmt: skip
        self.llm = LLM(self.model, tokenizer=self.tokenizer, kv_cache_memory_bytes=config.rollout.kv_cache_memory_bytes)
        self.step = 0
        self.trace: list[dict[str, Any]] = []
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "recipe.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
        (self.out / "metrics.jsonl").write_text("")

    # ---- rollouts -------------------------------------------------------------------------------
    def rollout(self, step: int) -> Rollouts:
        """Sample G completions for each of the step's P prompts from the current weights and score them."""
        r, g = self.cfg.rollout, self.cfg.grpo
        instances = step_instances(self.cfg, step)
        params = [
            SamplingParams(n=r.group_size, temperature=r.temperature, max_tokens=r.max_tokens,
                           seed=(self.cfg.run.seed * 1_000_003 + step) * 4096 + i * r.group_size,
                           logprobs=0 if g.tis_cap is not None else None)
            for i in range(len(instances))
        ]  # fmt: skip
        self.model.eval()
        outputs = self.llm.generate([task_prompt(x) for x in instances], params)
        prompt_ids, completion_ids, texts, rewards, engine_lp = [], [], [], [], []
        for x, out in zip(instances, outputs):
            row = []
            for c in out.outputs:
                prompt_ids.append(list(out.prompt_token_ids))
                completion_ids.append(list(c.token_ids))
                texts.append(c.text)
                row.append(float(self.reward_fn(x, c.text, list(c.token_ids))))
                if g.tis_cap is not None:
                    engine_lp.append([lp[t].logprob for lp, t in zip(c.logprobs or [], c.token_ids)])
            rewards.append(row)
        return Rollouts(instances, prompt_ids, completion_ids, texts, torch.tensor(rewards, dtype=torch.float32),
                        engine_lp if g.tis_cap is not None else None)  # fmt: skip

    # ---- update ---------------------------------------------------------------------------------
    def update(self, batch: Rollouts) -> dict[str, float]:
        """GRPO update(s) on one rollout batch; returns the step's loss statistics (last epoch)."""
        cfg, g = self.cfg, self.cfg.grpo
        temperature = cfg.rollout.temperature
        advantages = group_advantages(batch.rewards, normalize_std=g.normalize_std).reshape(-1)
        keep = [i for i, c in enumerate(batch.completion_ids) if c]  # an empty completion has no token to train
        prompts = [batch.prompt_ids[i] for i in keep]
        completions = [batch.completion_ids[i] for i in keep]
        advantages = advantages[keep]
        ids, mask = pad_sequences(prompts, completions)
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref = sequence_logprobs(self.reference, ids, temperature)
        self.model.train()
        old = None
        stats: dict[str, float] = {}
        for _ in range(g.ppo_epochs):
            logprobs = sequence_logprobs(self.model, ids, temperature)
            if old is None:
                old = logprobs.detach()  # the policy that sampled the batch: fixed for every epoch
                is_weights = self._is_weights(batch, keep, old, mask) if g.tis_cap is not None else None
            loss, s = grpo_loss(logprobs, old, ref, advantages, mask, clip_eps=g.clip_eps,
                                clip_eps_high=g.clip_eps_high, kl_coef=g.kl_coef, loss_agg=g.loss_agg,
                                is_weights=is_weights)  # fmt: skip
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            params = [p for p in self.model.parameters() if p.grad is not None]
            if cfg.optim.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip))
            else:
                grad_norm = (
                    float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
                )
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate(self.step)
            self.optimizer.step()
            stats = {"loss": float(loss.detach()), "grad_norm": grad_norm, **{k: float(v) for k, v in s.items()}}
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    def _is_weights(self, batch: Rollouts, keep: list[int], old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """min(π_train / π_engine, tis_cap) per sampled token, laid out as `mask` (1 where masked out)."""
        behavior = old.clone()
        for row, i in enumerate(keep):
            lp = batch.engine_logprobs[i]
            start = len(batch.prompt_ids[i]) - 1
            behavior[row, start : start + len(lp)] = torch.tensor(lp, dtype=old.dtype)
        weights = truncated_importance_weights(behavior, old, self.cfg.grpo.tis_cap)
        return torch.where(mask > 0, weights, torch.ones_like(weights))

    def learning_rate(self, step: int) -> float:
        o = self.cfg.optim
        return o.lr * min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else o.lr

    # ---- loop -----------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """One rollout + update; returns (and logs) the step's metrics."""
        t0 = time.perf_counter()
        batch = self.rollout(self.step)
        t1 = time.perf_counter()
        stats = self.update(batch)
        t2 = time.perf_counter()
        rewards = batch.rewards
        lengths = [len(c) for c in batch.completion_ids]
        record = {
            "step": self.step + 1,
            "reward_mean": float(rewards.mean()),
            "accuracy": float((rewards >= 1.0).float().mean()),
            "completion_len_mean": sum(lengths) / len(lengths),
            "zero_variance_groups": float((rewards == rewards[:, :1]).all(dim=1).float().mean()),
            **stats,
            "lr": self.learning_rate(self.step),
            "rollout_s": t1 - t0,
            "update_s": t2 - t1,
        }
        self.step += 1
        self.trace.append(record)
        if self.step % self.cfg.run.log_every == 0 or self.step == self.cfg.run.steps:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def run(self) -> dict[str, Any]:
        from rich.progress import Progress

        with Progress(disable=not self.progress, transient=True) as bar:
            task = bar.add_task("rl", total=self.cfg.run.steps)
            while self.step < self.cfg.run.steps:
                record = self.train_step()
                bar.update(task, advance=1, description=f"rl reward {record['reward_mean']:.3f}")
        model_dir = self.export()
        first, last = self.trace[0], self.trace[-1]
        return {"stage": "rl", "step": self.step, "model_dir": str(model_dir),
                "first": {k: first[k] for k in ("reward_mean", "accuracy", "completion_len_mean")},
                "last": {k: last[k] for k in ("reward_mean", "accuracy", "completion_len_mean", "kl")},
                "reward_mean_all": sum(r["reward_mean"] for r in self.trace) / len(self.trace)}  # fmt: skip

    def export(self) -> Path:
        """Write the trained policy (nemotron_h format) with its tokenizer into run.export_dir."""
        target = Path(self.cfg.run.export_dir) if self.cfg.run.export_dir else self.out / "model"
        dtype = DTYPES[self.cfg.run.export_dtype]
        state = {n: (t.detach().to(torch.float32 if keeps_fp32(n) else dtype) if t.is_floating_point() else t)
                 for n, t in self.model.state_dict().items()}  # fmt: skip
        config = self.model.config
        save_checkpoint(state, config.replace(extra={**config.extra, "torch_dtype": self.cfg.run.export_dtype}), target)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (self.tokenizer_dir / name).is_file():
                shutil.copy2(self.tokenizer_dir / name, target / name)
        return target


def rl(config: RLConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run an RL recipe to the end; returns the summary. `resume` is not supported yet (no checkpoints)."""
    if resume:
        raise ValueError("nemotron3 train rl does not support --resume yet (no training checkpoints)")
    out = Path(config.run.out_dir)
    if (out / "model").exists() and config.run.export_dir is None:
        raise FileExistsError(f"{out} already holds an exported model: choose another run.out_dir")
    return RLTrainer(config, progress=progress).run()


__all__ = ["RLConfig", "RLTrainer", "pad_sequences", "rl", "sequence_logprobs", "step_instances", "verifiable_reward"]
