"""`nemotron3 train rl`: GRPO-style reinforcement learning with verifiable rewards (RLVR).

One step (synchronous and on-policy with the default ``rollout.max_staleness: 0``; the asynchronous variant
is described after the list, and in docs/rl.md):

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

Asynchronous rollouts (``rollout.max_staleness`` k ≥ 1, NeMo-RL-style async GRPO): a background thread
(`RolloutProducer`) samples the batches of the next k steps with its own engine around a frozen *snapshot*
copy of the policy while the trainer updates. Batch s is sampled from policy version max(start, s − k)
(version v = the weights after v updates; start = 0, or the resumed step): at the start of step s the trainer
hands the producer its current weights (version s) for batch s + k. The producer also computes the behaviour
log-probs of the sampled tokens with a trainer-side forward of the snapshot (same code and numerics as the
trainer's, any temperature), and the update uses them as ``old_logprobs``: the ratio π_θ / π_behaviour enters
the clipped surrogate, so tokens whose probability already moved too far are clipped. Sampling seeds depend
on the step only, so an async run is reproducible. metrics.jsonl records ``policy_version`` and
``staleness`` (= step − version) per step.

MTP (``mtp.loss_weight`` > 0, a model with an MTP block): the update's forward also runs the MTP head and
adds loss_weight × its cross-entropy against the sampled completion tokens (`completion_mtp_loss`, the
pretraining `mtp_losses`), so speculative decoding keeps its acceptance rate on the RL policy.

Resume: a training checkpoint (model, AdamW, RNG in safetensors + the step counter, metrics and recipe in
JSON; nemotron3.train.checkpoint) is written every ``run.checkpoint_every`` steps and at the end under
``run.out_dir/checkpoints/step_N``; `rl(config, resume=True)` continues from the newest one (bit-exact in
synchronous mode; in async mode the in-flight batches are regenerated from the checkpointed weights).

Metrics per step go to ``run.out_dir/metrics.jsonl``: mean reward, accuracy (fraction of completions with
reward ≥ 1), mean completion length, loss, kl, clip_frac, ratio_mean, grad_norm, mtp_loss (when trained),
the fraction of groups with zero variance, policy version and staleness, and seconds spent in rollout /
update. The final model is exported in the nemotron_h format (`save_checkpoint`) with the tokenizer files
copied next to it. Not implemented yet: micro-batching, multi-turn tool environments.
"""

from __future__ import annotations

import copy
import json
import queue
import shutil
import threading
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
from nemotron3.train.checkpoint import list_checkpoints, load_training_checkpoint, save_training_checkpoint
from nemotron3.train.config import Recipe
from nemotron3.train.data import IGNORE_INDEX
from nemotron3.train.evaluate import task_prompt
from nemotron3.train.losses import mtp_losses
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
    max_staleness: int = 0  # k: batch s is sampled from policy version s − k (async producer); 0 = synchronous


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
    checkpoint_every: int = 0  # training checkpoint every N steps (always one at the end); 0 = only at the end
    keep_checkpoints: int = 2  # newest training checkpoints kept under out_dir/checkpoints


@dataclass
class RLMTPSection:
    loss_weight: float = 0.0  # weight of the MTP cross-entropy on the sampled completions; 0 = MTP not trained
    depths: int = 1  # MTP depths run in the update's forward (when loss_weight > 0)


@dataclass
class RLConfig(Recipe):
    model: RLModelSection = field(default_factory=RLModelSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    optim: RLOptimSection = field(default_factory=RLOptimSection)
    run: RLRunSection = field(default_factory=RLRunSection)
    mtp: RLMTPSection = field(default_factory=RLMTPSection)

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
            (r.max_staleness >= 0, "rollout.max_staleness must be >= 0 (0 = synchronous rollouts)"),
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
            (run.checkpoint_every >= 0, "run.checkpoint_every must be >= 0 (0 = only at the end)"),
            (run.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1"),
            (self.mtp.loss_weight >= 0, "mtp.loss_weight must be >= 0"),
            (self.mtp.depths >= 1, "mtp.depths must be >= 1"),
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


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B, L - 1]: log-softmax(logits[:, t] / temperature) at ids[t + 1], from the [B, L, V] logits of `ids`."""
    logits = logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def sequence_logprobs(model: torch.nn.Module, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B, L - 1]: log π(ids[t + 1] | ids[≤ t]) under the model with logits / temperature (teacher-forced).
    Right padding never reaches an earlier position (causal attention, forward-only Mamba scan)."""
    return token_logprobs(model(ids).logits, ids, temperature)


def completion_mtp_loss(mtp_logits: Sequence[torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over MTP depths of the token-mean cross-entropy of the MTP predictions against the sampled
    completion tokens: depth d at position t predicts ids[t + 1 + d], counted only where that token is a
    completion token (`mask` [B, L - 1] marks the positions t whose ids[t + 1] is one). Reuses pretraining's
    `mtp_losses` (labels shifted per depth); each row is one document (right padding is never a label)."""
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(mask > 0, ids[:, 1:], IGNORE_INDEX)
    per_depth = mtp_losses(list(mtp_logits), labels, torch.zeros_like(ids))
    return torch.stack([total / max(count, 1) for total, count in per_depth]).mean()


@dataclass
class Rollouts:
    instances: list[TaskInstance]  # P
    prompt_ids: list[list[int]]  # B = P · G, each prompt repeated G times
    completion_ids: list[list[int]]  # B
    texts: list[str]  # B
    rewards: torch.Tensor  # [P, G]
    engine_logprobs: list[list[float]] | None  # B, when asked (grpo.tis_cap)
    version: int = 0  # the policy version (number of updates) whose weights sampled the batch
    behavior_logprobs: torch.Tensor | None = None  # [B', L - 1] as `update_inputs`; async rollouts only


def update_inputs(batch: Rollouts) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The rows an update trains (non-empty completions: an empty one has no token) and their right-padded
    ids [B', L] and completion mask [B', L - 1] (`pad_sequences`)."""
    keep = [i for i, c in enumerate(batch.completion_ids) if c]
    ids, mask = pad_sequences([batch.prompt_ids[i] for i in keep], [batch.completion_ids[i] for i in keep])
    return keep, ids, mask


class RolloutProducer:
    """Background thread that samples rollout batches from a snapshot of the policy (asynchronous RL).

    `submit(step, version, weights)` queues a job; the thread handles jobs in order: it copies `weights` into
    its snapshot model (the "in-flight weight update", at a step boundary: never during a generation) and
    calls ``sample(step, version)``. `take(step)` returns that batch, re-raising any error of the thread.
    `close()` stops the thread after its current job (the thread is a daemon: it never blocks exit)."""

    def __init__(self, snapshot: torch.nn.Module, sample: Callable[[int, int], Rollouts], timeout_s: float) -> None:
        self.snapshot, self.sample, self.timeout_s = snapshot, sample, timeout_s
        self.jobs: queue.Queue[tuple[int, int, dict[str, torch.Tensor]] | None] = queue.Queue()
        self.results: queue.Queue[tuple[int, Rollouts | BaseException]] = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._work, name="rl-rollout-producer", daemon=True)
        self.thread.start()

    def submit(self, step: int, version: int, weights: dict[str, torch.Tensor]) -> None:
        self.jobs.put((step, version, weights))

    def take(self, step: int) -> Rollouts:
        """The batch of `step` (jobs finish in submission order); raises if the thread failed or timed out."""
        try:
            done, result = self.results.get(timeout=self.timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no rollout batch for step {step} after {self.timeout_s} s") from None
        if isinstance(result, BaseException):
            raise RuntimeError(f"the rollout producer failed on step {done}") from result  # noqa: TRY004
        if done != step:
            raise RuntimeError(f"rollout producer returned step {done}, expected {step}")
        return result

    def close(self, timeout_s: float = 60.0) -> None:
        self.stopping.set()
        self.jobs.put(None)
        self.thread.join(timeout_s)

    def _work(self) -> None:
        while not self.stopping.is_set():
            job = self.jobs.get()
            if job is None or self.stopping.is_set():
                return
            step, version, weights = job
            try:
                with torch.no_grad():
                    self.snapshot.load_state_dict(weights)
                self.results.put((step, self.sample(step, version)))
            except BaseException as e:  # noqa: BLE001 - handed to the trainer thread, which re-raises it
                self.results.put((step, e))
                return


# ------------------------------------------------------------------------------------------ trainer


class RLTrainer:
    """GRPO on the policy's own rollouts: `RLTrainer(cfg).run()` (see the module docstring).

    ``resume`` restores the newest training checkpoint under run.out_dir/checkpoints, if any."""

    stage = "rl"  # the progress bar's and summary's name
    STATE_VERSION = 1  # of the JSON state in training checkpoints
    producer_timeout_s = 1800.0  # longest wait for one async rollout batch before giving up

    def __init__(
        self, config: RLConfig, *, reward_fn: RewardFn | None = None, progress: bool = True, resume: bool = False
    ) -> None:
        if not isinstance(config, RLConfig):
            raise TypeError("RLTrainer takes an RLConfig (RLConfig.from_file / from_dict)")
        from nemotron3.loader import load_model

        self.cfg = config
        self.reward_fn = reward_fn or verifiable_reward
        self.progress = progress
        self.out = Path(config.run.out_dir)
        self.ckpt_root = self.out / "checkpoints"
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
        self.producer: RolloutProducer | None = None  # started by the first async step
        self._next_job = 0  # the next step whose batch the producer has not been asked for
        self.last_batch: Rollouts | None = None  # the batch the latest step trained on
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "recipe.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
        (self.out / "metrics.jsonl").write_text("")
        if resume and list_checkpoints(self.ckpt_root):
            self.restore(list_checkpoints(self.ckpt_root)[-1])

    # ---- rollouts -------------------------------------------------------------------------------
    def rollout(self, step: int) -> Rollouts:
        """Sample G completions for each of the step's P prompts from the current weights and score them."""
        return self.sample(step, self.llm, self.model, version=self.step)

    def sample(self, step: int, llm: LLM, model: torch.nn.Module, version: int) -> Rollouts:
        """The step's rollouts sampled by `llm` (an engine around `model`, whose weights are `version`).
        Seeds depend on the step only, so the same weights always give the same batch."""
        r, g = self.cfg.rollout, self.cfg.grpo
        instances = step_instances(self.cfg, step)
        params = [
            SamplingParams(n=r.group_size, temperature=r.temperature, max_tokens=r.max_tokens,
                           seed=(self.cfg.run.seed * 1_000_003 + step) * 4096 + i * r.group_size,
                           logprobs=0 if g.tis_cap is not None else None)
            for i in range(len(instances))
        ]  # fmt: skip
        model.eval()
        outputs = llm.generate([task_prompt(x) for x in instances], params)
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
                        engine_lp if g.tis_cap is not None else None, version=version)  # fmt: skip

    def next_batch(self) -> Rollouts:
        """The rollouts of the current step: sampled now (synchronous) or taken from the producer (async)."""
        if self.cfg.rollout.max_staleness == 0:
            return self.rollout(self.step)
        if self.producer is None:
            self.producer = self._start_producer()
            self._next_job = self.step
        # hand the current weights (version = self.step) to the jobs up to step + k: batch j gets version j − k
        last = max(self.step, min(self.step + self.cfg.rollout.max_staleness, self.cfg.run.steps - 1))
        if self._next_job <= last:
            weights = {n: t.detach().clone() for n, t in self.model.state_dict().items()}
            for job in range(self._next_job, last + 1):
                self.producer.submit(job, self.step, weights)
            self._next_job = last + 1
        return self.producer.take(self.step)

    def _start_producer(self) -> RolloutProducer:
        """A producer thread with its own engine around a frozen snapshot copy of the policy."""
        snapshot = copy.deepcopy(self.model)
        for p in snapshot.parameters():
            p.requires_grad_(False)
        llm = LLM(snapshot, tokenizer=self.tokenizer, kv_cache_memory_bytes=self.cfg.rollout.kv_cache_memory_bytes)

        def sample(step: int, version: int) -> Rollouts:
            batch = self.sample(step, llm, snapshot, version)
            batch.behavior_logprobs = self.behavior_logprobs(snapshot, batch)
            return batch

        return RolloutProducer(snapshot, sample, self.producer_timeout_s)

    def behavior_logprobs(self, snapshot: torch.nn.Module, batch: Rollouts) -> torch.Tensor:
        """[B', L - 1] log-probs of the sampled tokens under the sampling weights, computed exactly as the
        trainer computes its own (train mode, logits / temperature), so the ratio is 1 where nothing moved."""
        _, ids, _ = update_inputs(batch)
        snapshot.train()
        with torch.no_grad():
            return sequence_logprobs(snapshot, ids, self.cfg.rollout.temperature)

    def close(self) -> None:
        """Stop the rollout producer, if one runs (idempotent)."""
        if self.producer is not None:
            self.producer.close()
            self.producer = None

    # ---- update ---------------------------------------------------------------------------------
    def policy_forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The policy's teacher-forced log-probs of the sampled tokens [B, L - 1] (with gradient) and, when
        mtp.loss_weight > 0 and the model has an MTP block, the MTP loss on the completion tokens."""
        depths = self.cfg.mtp.depths if self.cfg.mtp.loss_weight > 0 and getattr(self.model, "mtp", None) else 0
        if depths == 0:
            return sequence_logprobs(self.model, ids, self.cfg.rollout.temperature), None
        out = self.model(ids, mtp_depths=depths)
        return token_logprobs(out.logits, ids, self.cfg.rollout.temperature), completion_mtp_loss(
            out.mtp_logits, ids, mask
        )

    def optimizer_step(self, loss: torch.Tensor) -> float:
        """Backward, gradient clipping and one AdamW step at the step's learning rate; returns the grad norm."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.optim.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step)
        self.optimizer.step()
        return grad_norm

    def update(self, batch: Rollouts) -> dict[str, float]:
        """GRPO update(s) on one rollout batch; returns the step's loss statistics (last epoch).

        ``old_logprobs`` (the denominator of the ratio) are the behaviour policy's: the batch's
        `behavior_logprobs` for async rollouts, else the current policy's own, detached, at the first epoch."""
        cfg, g = self.cfg, self.cfg.grpo
        temperature = cfg.rollout.temperature
        advantages = group_advantages(batch.rewards, normalize_std=g.normalize_std).reshape(-1)
        keep, ids, mask = update_inputs(batch)
        advantages = advantages[keep]
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref = sequence_logprobs(self.reference, ids, temperature)
        self.model.train()
        old = batch.behavior_logprobs  # None: on-policy, fixed from the first epoch's forward
        is_weights = None
        stats: dict[str, float] = {}
        for _ in range(g.ppo_epochs):
            logprobs, mtp_loss = self.policy_forward(ids, mask)
            if old is None:
                old = logprobs.detach()
            if g.tis_cap is not None and is_weights is None:
                is_weights = self._is_weights(batch, keep, old, mask)
            loss, s = grpo_loss(logprobs, old, ref, advantages, mask, clip_eps=g.clip_eps,
                                clip_eps_high=g.clip_eps_high, kl_coef=g.kl_coef, loss_agg=g.loss_agg,
                                is_weights=is_weights)  # fmt: skip
            if mtp_loss is not None:
                loss = loss + cfg.mtp.loss_weight * mtp_loss
            grad_norm = self.optimizer_step(loss)
            stats = {"loss": float(loss.detach()), "grad_norm": grad_norm, **{k: float(v) for k, v in s.items()}}
            if mtp_loss is not None:
                stats["mtp_loss"] = float(mtp_loss.detach())
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    def _is_weights(self, batch: Rollouts, keep: list[int], old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """min(π_old / π_engine, tis_cap) per sampled token, laid out as `mask` (1 where masked out): the
        correction for the engine/trainer numerical mismatch of the sampling policy."""
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
        batch = self.next_batch()
        t1 = time.perf_counter()
        stats = self.update(batch)
        t2 = time.perf_counter()
        self.last_batch = batch
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
            "policy_version": batch.version,
            "staleness": self.step - batch.version,
            "rollout_s": t1 - t0,
            "update_s": t2 - t1,
        }
        self.step += 1
        self.trace.append(record)
        if self._logged(self.step):
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def _logged(self, step: int) -> bool:
        return step % self.cfg.run.log_every == 0 or step == self.cfg.run.steps

    def train_loop(self, describe: Callable[[dict[str, Any]], str]) -> None:
        """Steps to run.steps with a progress bar, a training checkpoint every run.checkpoint_every steps and
        one at the end; the rollout producer is stopped however the loop ends."""
        from rich.progress import Progress

        every = self.cfg.run.checkpoint_every
        try:
            with Progress(disable=not self.progress, transient=True) as bar:
                task = bar.add_task(self.stage, total=self.cfg.run.steps, completed=self.step)
                while self.step < self.cfg.run.steps:
                    record = self.train_step()
                    bar.update(task, advance=1, description=describe(record))
                    if every and self.step % every == 0 and self.step < self.cfg.run.steps:
                        self.save()
            self.save()
        finally:
            self.close()

    def run(self) -> dict[str, Any]:
        self.train_loop(lambda record: f"rl reward {record['reward_mean']:.3f}")
        model_dir = self.export()
        first, last = self.trace[0], self.trace[-1]
        return {"stage": "rl", "step": self.step, "model_dir": str(model_dir),
                "first": {k: first[k] for k in ("reward_mean", "accuracy", "completion_len_mean")},
                "last": {k: last[k] for k in ("reward_mean", "accuracy", "completion_len_mean", "kl")},
                "reward_mean_all": sum(r["reward_mean"] for r in self.trace) / len(self.trace)}  # fmt: skip

    # ---- training checkpoints -------------------------------------------------------------------
    def _recipe_json(self) -> dict[str, Any]:
        """The recipe as JSON stores it, without the run keys a resume may change."""
        recipe = json.loads(json.dumps(self.cfg.to_dict()))
        for key in RESUMABLE_RUN_KEYS:
            recipe.get("run", {}).pop(key, None)
        return recipe

    def save(self) -> Path:
        """Training checkpoint of the current step (model, AdamW, RNG, step counter, metrics, recipe)."""
        state = {"version": self.STATE_VERSION, "stage": self.stage, "step": self.step, "trace": self.trace,
                 "recipe": self._recipe_json()}  # fmt: skip
        return save_training_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, state,
                                        self.cfg.run.keep_checkpoints)  # fmt: skip

    def restore(self, path: Path) -> None:
        """Continue from checkpoint `path`: weights, AdamW state, RNG, step counter and the metrics so far
        (metrics.jsonl is rewritten with the logged ones). The recipe must match, except RESUMABLE_RUN_KEYS."""
        if self.producer is not None:
            raise RuntimeError("restore before the first step (the rollout producer is running)")
        state = load_training_checkpoint(path, self.model, self.optimizer)
        if state.get("version") != self.STATE_VERSION or state.get("stage") != self.stage:
            raise ValueError(
                f"checkpoint {path} is not a {self.stage} checkpoint of state version {self.STATE_VERSION}"
            )
        ours = self._recipe_json()
        if state["recipe"] != ours:
            changed = sorted(k for k in ours if state["recipe"].get(k) != ours[k])
            raise ValueError(f"cannot resume {path}: the recipe differs from the checkpoint's in section(s) {changed}")
        self.step, self.trace = state["step"], list(state["trace"])
        lines = [json.dumps(r) + "\n" for r in self.trace if self._logged(r["step"])]
        (self.out / "metrics.jsonl").write_text("".join(lines), encoding="utf-8")

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


RESUMABLE_RUN_KEYS = ("steps", "log_every", "threads", "checkpoint_every", "keep_checkpoints", "export_dir",
                      "export_dtype")  # fmt: skip
"""Run keys a resumed run may change (e.g. more steps); every other recipe value must match the checkpoint's."""


def check_run_dir(config: RLConfig, resume: bool) -> None:
    """Refuse to start over a finished or checkpointed run in run.out_dir unless resuming it."""
    out = Path(config.run.out_dir)
    if resume:
        return
    if (out / "model").exists() and config.run.export_dir is None:
        raise FileExistsError(f"{out} already holds an exported model: choose another run.out_dir")
    if list_checkpoints(out / "checkpoints"):
        raise FileExistsError(f"{out} already holds checkpoints: pass --resume to continue that run, or choose "
                              "another run.out_dir")  # fmt: skip


def rl(config: RLConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run an RL recipe to the end; returns the summary. `resume` continues from the newest training
    checkpoint in run.out_dir/checkpoints (from scratch when there is none)."""
    check_run_dir(config, resume)
    return RLTrainer(config, progress=progress, resume=resume).run()


__all__ = ["RLConfig", "RLTrainer", "RolloutProducer", "Rollouts", "check_run_dir", "completion_mtp_loss",
           "pad_sequences", "rl", "sequence_logprobs", "step_instances", "token_logprobs", "update_inputs",
           "verifiable_reward"]  # fmt: skip
