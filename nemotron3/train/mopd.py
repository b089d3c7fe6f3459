"""`nemotron3 train mopd`: multi-teacher on-policy distillation (MOPD).

The RL trainer (nemotron3.train.rl) with the reward replaced by dense per-token teacher guidance. One step:

1. Prompts and rollouts exactly as `RLTrainer.rollout`: P fresh task prompts cycling through
   ``rollout.domains``, G completions each sampled by our engine from the *current* student (G = 1 is allowed
   here: the distillation signal is per token, no group baseline is needed), verifiable rewards computed
   as in RL (logged, and used only when ``mopd.reward_weight`` > 0).
2. Routing. Each prompt goes to the teacher of its domain (``teachers: {domain: checkpoint}``, a nemotron_h
   directory or "default"; one teacher object per distinct checkpoint). Every teacher must share the
   student's tokenizer: a different vocab size (or a different tokenizer.json next to the teacher) is refused.
3. Scoring. The student's log-probs of its sampled tokens are teacher-forced as in RL (`sequence_logprobs`,
   logits / rollout temperature, completion mask); each teacher runs one no-grad teacher-forced forward over
   prompt + completion of its own domain's rows and gathers the log-prob of the same sampled tokens, at the
   same temperature (so a teacher identical to the student gives advantages of exactly 0).
4. Update. Per-token advantage A_t = log π_T(y_t) − log π_S(y_t) (`mopd_token_advantages`, the negated
   single-sample reverse-KL estimate), times ``mopd.distill_weight``, plus ``mopd.reward_weight`` × the GRPO
   group advantage of the completion's reward when that weight is > 0 (`group_advantages`, with
   ``grpo.normalize_std``; needs G ≥ 2); loss `mopd_loss` (``mopd.loss_agg``), optionally weighted by the
   truncated importance weights of ``grpo.tis_cap`` as in RL; one plain AdamW step (RL's optimizer, warm-up
   and gradient clipping).

Asynchronous rollouts (``rollout.max_staleness`` k ≥ 1), resume (``run.checkpoint_every``, `mopd(...,
resume=True)`) and the MTP loss (``mtp.loss_weight``) are RL's (nemotron3.train.rl, docs/rl.md). With stale
rollouts the teachers still score on the trainer side, the advantage uses the *sampling* student's log-prob,
A_t = log π_T(y_t) − log π_b(y_t) (the reverse-KL estimate of the policy that sampled y, as the Nemotron 3
MOPD notes describe), and the loss is the clipped surrogate of ratio π_S / π_b (`mopd_loss` with
``behavior_logprobs``; ``grpo.clip_eps`` / ``clip_eps_high``).

The ``grpo`` section is RL's: MOPD reads only ``normalize_std``, ``tis_cap`` and (async only) ``clip_eps`` /
``clip_eps_high`` from it; keys it does not use must keep their defaults (``kl_coef`` 0: the teachers replace
the reference model; ``ppo_epochs`` 1: one update per batch). Metrics per step (``run.out_dir/metrics.jsonl``):
RL's reward / accuracy / length / loss / grad_norm / staleness / timing, plus ``kl`` (mean reverse-KL
estimate log π_S − log π_T over all completion tokens, π_b for stale rollouts), ``reverse_kl/<domain>`` per
domain, ``advantage_mean`` and ``teacher_s`` (seconds in teacher forwards). The student is exported like
RL's policy. Not implemented yet: teacher top-k / full-distribution KL, teachers with another tokenizer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import torch

from nemotron3.default_model import resolve_model
from nemotron3.train.objectives import LOSS_AGGREGATIONS, group_advantages, mopd_loss
from nemotron3.train.rl import (
    RewardFn,
    RLConfig,
    RLRunSection,
    RLTrainer,
    Rollouts,
    check_run_dir,
    sequence_logprobs,
    update_inputs,
)
from nemotron3.train.tasks import DOMAINS

# ------------------------------------------------------------------------------------------ recipe


@dataclass
class MOPDSection:
    distill_weight: float = 1.0  # weight of the per-token teacher advantage
    reward_weight: float = 0.0  # weight of the GRPO reward advantage mixed in; 0 = pure distillation
    loss_agg: str = "token-mean"  # or "seq-mean"


@dataclass
class MOPDRunSection(RLRunSection):
    out_dir: str = "runs/mopd"


@dataclass
class _MOPDSections(RLConfig):
    """RL's sections plus ``mopd`` (every field a section dataclass, so `Recipe.from_dict` can build it)."""

    run: MOPDRunSection = field(default_factory=MOPDRunSection)
    mopd: MOPDSection = field(default_factory=MOPDSection)

    def validate(self) -> None:
        """Checked once the teachers are in (`MOPDConfig.validate`)."""


@dataclass
class MOPDConfig(_MOPDSections):
    teachers: dict[str, str] = field(default_factory=dict)  # domain → teacher checkpoint dir or "default"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Self:
        """Like `Recipe.from_dict`, with the free-form ``teachers`` mapping {domain: checkpoint}."""
        if not isinstance(raw, dict):
            raise ValueError(f"a recipe must be a mapping of sections, got {type(raw).__name__}")  # noqa: TRY004
        rest = {k: v for k, v in raw.items() if k != "teachers"}
        teachers = raw.get("teachers") or {}
        if not isinstance(teachers, dict):  # ValueError, as every recipe error (the CLI reports those)
            raise ValueError(f"recipe section 'teachers' must be a mapping {{domain: checkpoint}}, got "  # noqa: TRY004
                             f"{type(teachers).__name__}")  # fmt: skip
        bad = sorted(str(k) for k in teachers if k not in DOMAINS)
        if bad:
            raise ValueError(f"unknown teacher domain(s) {[f'teachers.{k}' for k in bad]}; domains: {list(DOMAINS)}")
        for domain, path in teachers.items():
            if not isinstance(path, str) or not path:
                raise ValueError(f"teachers.{domain} must be a checkpoint directory or 'default', got {path!r}")
        sections = _MOPDSections.from_dict(rest)
        config = cls(**{f.name: getattr(sections, f.name) for f in dataclasses.fields(_MOPDSections)},
                     teachers=dict(teachers))  # fmt: skip
        config.validate()
        return config

    def validate(self) -> None:
        r, g, m = self.rollout, self.grpo, self.mopd
        # RL's checks, except that a group of one is fine for distillation (the signal is per token)
        RLConfig.validate(dataclasses.replace(self, rollout=dataclasses.replace(r, group_size=max(r.group_size, 2))))
        missing = [d for d in dict.fromkeys(r.domains) if d not in self.teachers]
        checks = [
            (not missing, f"teachers: no teacher for rollout domain(s) {missing} (teachers.<domain>: checkpoint)"),
            (r.group_size >= 1, "rollout.group_size must be >= 1"),
            (m.distill_weight >= 0 and m.reward_weight >= 0, "mopd.distill_weight and mopd.reward_weight must be >= 0"),
            (m.distill_weight > 0 or m.reward_weight > 0, "mopd.distill_weight or mopd.reward_weight must be > 0"),
            (m.reward_weight == 0 or r.group_size >= 2,
             "mopd.reward_weight > 0 needs rollout.group_size >= 2 (group advantages)"),
            (m.loss_agg in LOSS_AGGREGATIONS, f"mopd.loss_agg must be one of {list(LOSS_AGGREGATIONS)}"),
            (g.kl_coef == 0, "grpo.kl_coef is not used by mopd (the teachers replace the reference): keep it 0"),
            (g.ppo_epochs == 1, "grpo.ppo_epochs is not used by mopd (strictly on-policy): keep it 1"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid recipe: {message}")


# ------------------------------------------------------------------------------------------ trainer


def _tokenizer_bytes(directory: Path) -> bytes | None:
    path = directory / "tokenizer.json"
    return path.read_bytes() if path.is_file() else None


class MOPDTrainer(RLTrainer):
    """On-policy distillation from per-domain teachers: `MOPDTrainer(cfg).run()` (see the module docstring).

    ``teachers`` overrides the recipe's teacher of the given domains with ready nn.Modules (tests, or a
    caller that already holds them); they are checked like loaded ones."""

    stage = "mopd"

    def __init__(
        self,
        config: MOPDConfig,
        *,
        teachers: Mapping[str, torch.nn.Module] | None = None,
        reward_fn: RewardFn | None = None,
        progress: bool = True,
        resume: bool = False,
    ) -> None:
        if not isinstance(config, MOPDConfig):
            raise TypeError("MOPDTrainer takes an MOPDConfig (MOPDConfig.from_file / from_dict)")
        super().__init__(config, reward_fn=reward_fn, progress=progress, resume=resume)
        given = dict(teachers or {})
        unknown = sorted(set(given) - set(DOMAINS))
        if unknown:
            raise ValueError(f"teachers given for unknown domain(s) {unknown}; domains: {list(DOMAINS)}")
        self.teachers: dict[str, torch.nn.Module] = {}
        loaded: dict[str, torch.nn.Module] = {}  # one model per distinct checkpoint
        for domain in dict.fromkeys(config.rollout.domains):
            if domain in given:
                teacher = given[domain]
            else:
                spec = config.teachers[domain]
                teacher = loaded.get(spec) or self._load_teacher(domain, spec)
                loaded[spec] = teacher
            self._check_vocab(domain, teacher)
            self.teachers[domain] = teacher

    def _load_teacher(self, domain: str, spec: str) -> torch.nn.Module:
        from nemotron3.loader import load_model

        directory = resolve_model(spec)
        teacher_tok = _tokenizer_bytes(Path(directory).expanduser())
        if teacher_tok is not None and teacher_tok != _tokenizer_bytes(self.tokenizer_dir):
            raise ValueError(f"teachers.{domain}: {spec} has a different tokenizer.json from the student's "
                             f"({self.tokenizer_dir}); MOPD needs one shared tokenizer")  # fmt: skip
        teacher = load_model(directory, dtype=torch.float32).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def _check_vocab(self, domain: str, teacher: torch.nn.Module) -> None:
        student_vocab = self.model.config.vocab_size
        teacher_vocab = getattr(getattr(teacher, "config", None), "vocab_size", None)
        if teacher_vocab != student_vocab:
            raise ValueError(f"teachers.{domain}: vocab size {teacher_vocab} differs from the student's "
                             f"{student_vocab}; MOPD needs one shared tokenizer")  # fmt: skip

    # ---- scoring --------------------------------------------------------------------------------
    def teacher_logprobs(self, batch: Rollouts, keep: list[int], ids: torch.Tensor) -> torch.Tensor:
        """[B, L - 1] log-probs of the sampled tokens, each row scored by the teacher of its prompt's domain."""
        group = self.cfg.rollout.group_size
        rows_of: dict[str, list[int]] = {}
        for row, i in enumerate(keep):
            rows_of.setdefault(batch.instances[i // group].domain, []).append(row)
        out = torch.zeros(ids.shape[0], ids.shape[1] - 1)
        with torch.no_grad():
            for domain, rows in rows_of.items():
                teacher = self.teachers[domain]
                was_training = teacher.training
                teacher.eval()
                sub = ids if len(rows) == ids.shape[0] else ids[rows]
                out[rows] = sequence_logprobs(teacher, sub, self.cfg.rollout.temperature)
                teacher.train(was_training)
        return out

    # ---- update ---------------------------------------------------------------------------------
    def update(self, batch: Rollouts) -> dict[str, float]:
        """One MOPD step on a rollout batch: teacher scoring, `mopd_loss`, AdamW. For async rollouts the
        batch's behaviour log-probs are the student's side of the advantage and the ratio's denominator."""
        cfg, m = self.cfg, self.cfg.mopd
        keep, ids, mask = update_inputs(batch)  # an empty completion has no token to train
        if not keep:
            return {"loss": 0.0, "grad_norm": 0.0, "kl": 0.0, "advantage_mean": 0.0, "teacher_s": 0.0}
        t0 = time.perf_counter()
        teacher = self.teacher_logprobs(batch, keep, ids)
        teacher_s = time.perf_counter() - t0
        reward_adv = None
        if m.reward_weight > 0:
            reward_adv = group_advantages(batch.rewards, normalize_std=cfg.grpo.normalize_std).reshape(-1)[keep]
        self.model.train()
        logprobs, mtp_loss = self.policy_forward(ids, mask)
        behavior = batch.behavior_logprobs  # None: on-policy, the student's own log-probs
        old = logprobs.detach() if behavior is None else behavior
        is_weights = self._is_weights(batch, keep, old, mask) if cfg.grpo.tis_cap is not None else None
        loss, s = mopd_loss(logprobs, teacher, mask, reward_advantages=reward_adv, reward_weight=m.reward_weight,
                            distill_weight=m.distill_weight, loss_agg=m.loss_agg, is_weights=is_weights,
                            behavior_logprobs=behavior, clip_eps=cfg.grpo.clip_eps,
                            clip_eps_high=cfg.grpo.clip_eps_high)  # fmt: skip
        if mtp_loss is not None:
            loss = loss + cfg.mtp.loss_weight * mtp_loss
        grad_norm = self.optimizer_step(loss)
        self.optimizer.zero_grad(set_to_none=True)
        stats = {"loss": float(loss.detach()), "grad_norm": grad_norm, "kl": float(s["reverse_kl"]),
                 "advantage_mean": float(s["advantage_mean"]), "teacher_s": teacher_s,
                 **{k: float(s[k]) for k in ("clip_frac", "ratio_mean") if k in s}}  # fmt: skip
        if mtp_loss is not None:
            stats["mtp_loss"] = float(mtp_loss.detach())
        domains = [batch.instances[i // cfg.rollout.group_size].domain for i in keep]
        kl_tokens = (old - teacher) * mask
        for domain in dict.fromkeys(cfg.rollout.domains):
            rows = [r for r, d in enumerate(domains) if d == domain]
            n = float(mask[rows].sum()) if rows else 0.0
            stats[f"reverse_kl/{domain}"] = float(kl_tokens[rows].sum()) / n if n else 0.0
        return stats

    # ---- loop -----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.train_loop(lambda record: f"mopd reverse-KL {record['kl']:.3f}")
        model_dir = self.export()
        keys = ["reward_mean", "accuracy", "completion_len_mean", "kl",
                *(f"reverse_kl/{d}" for d in dict.fromkeys(self.cfg.rollout.domains))]  # fmt: skip
        first, last = self.trace[0], self.trace[-1]
        return {"stage": "mopd", "step": self.step, "model_dir": str(model_dir),
                "first": {k: first[k] for k in keys}, "last": {k: last[k] for k in keys},
                "reward_mean_all": sum(r["reward_mean"] for r in self.trace) / len(self.trace)}  # fmt: skip


def mopd(config: MOPDConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run an MOPD recipe to the end; returns the summary. `resume` continues from the newest training
    checkpoint in run.out_dir/checkpoints (from scratch when there is none)."""
    check_run_dir(config, resume)
    return MOPDTrainer(config, progress=progress, resume=resume).run()


__all__ = ["MOPDConfig", "MOPDSection", "MOPDTrainer", "mopd"]
