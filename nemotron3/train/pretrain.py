"""`nemotron3 train pretrain`: the pretraining loop of the Nemotron 3 recipe, at any scale.

One optimizer step: the global batch is split into micro-batches; each runs the model over packed
documents (doc_ids), the loss is next-token CE + mtp.loss_weight · mean over depths of the MTP CE +
moe.seq_aux_loss_coef · Σ_layers sequence aux loss, normalised by the *global* label counts so that
accumulation equals one big batch. Gradients are summed in `precision.grad_reduce_dtype` (fp32 as the
Nemotron 3 fix; bf16 to show the difference), clipped, and AdamW (decoupled weight decay on matrices
only) steps with the WSD learning rate. After the step every router's selection bias moves by the
aux-loss-free rule. A loss far above the recent median (or non-finite) is a spike: the step is dropped,
the last checkpoint restored, the learning rate scaled down, and training continues on fresh data.

Checkpoints (nemotron3.train.checkpoint) hold model, optimizer, RNG, data position and loop state, so a
resumed run reproduces the uninterrupted loss trace bit for bit on CPU. Metrics go to metrics.jsonl and
loss.png in the run directory; the final model is exported in the nemotron_h format with its tokenizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from nemotron3.config import ModelConfig, pattern_to_kinds, preset
from nemotron3.default_model import resolve_model
from nemotron3.io.checkpoint import save_checkpoint
from nemotron3.model.mamba2 import Mamba2Mixer
from nemotron3.model.moe import MoE
from nemotron3.model.nemotron import NemotronHForCausalLM, keeps_fp32
from nemotron3.train.balance import expert_load, routers, sequence_aux_loss, update_expert_bias
from nemotron3.train.checkpoint import list_checkpoints, load_training_checkpoint, save_training_checkpoint
from nemotron3.train.config import PretrainConfig, SpikeSection
from nemotron3.train.data import IGNORE_INDEX, PackedBatch
from nemotron3.train.distributed import clip_grad_norm_ as distributed_clip_grad_norm_
from nemotron3.train.distributed import (
    destroy_distributed,
    gather_full_state_dict,
    init_distributed,
    shard_model,
    sync_expert_load,
)
from nemotron3.train.losses import mtp_labels, mtp_losses, token_cross_entropy
from nemotron3.train.prepare import PreparedData, prepare_data, train_dataset, validation_batches
from nemotron3.train.schedule import WSDSchedule
from nemotron3.train.tokenizer import DOC_END_ID, IM_END_ID

STATE_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------ model


def build_model_config(cfg: PretrainConfig, vocab_size: int) -> ModelConfig:
    """The recipe's architecture: a preset with overrides (`pattern` sets hybrid_override_pattern)."""
    overrides = dict(cfg.model.overrides)
    if "pattern" in overrides:
        overrides["layers_block_type"] = pattern_to_kinds(overrides.pop("pattern"))
    if "mtp_pattern" in overrides:
        overrides["mtp_layers_block_type"] = pattern_to_kinds(overrides.pop("mtp_pattern"), "mtp_pattern")
    overrides.setdefault("vocab_size", vocab_size)
    overrides.setdefault("eos_token_id", [IM_END_ID, DOC_END_ID])
    overrides.setdefault("max_position_embeddings", max(cfg.data.seq_len, 4096))
    try:
        config = preset(cfg.model.preset).replace(**overrides)
    except TypeError as e:
        raise ValueError(f"invalid model override in the recipe: {e}") from None
    if config.vocab_size < vocab_size:
        raise ValueError(f"model.overrides.vocab_size {config.vocab_size} is smaller than the tokenizer's {vocab_size}")
    return config


def build_model(config: ModelConfig, seed: int) -> NemotronHForCausalLM:
    model = NemotronHForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def apply_fake_quant(model: NemotronHForCausalLM, seed: int) -> list[str]:
    """NVFP4 training (quant.fake_quant): swap the Mamba and MoE linears of all but the last ~15 % of
    layers for FakeQuantLinear with the full recipe (W/x/dy NVFP4, 16x16 W tiles, RHT, SR). Attention,
    embeddings, LM head and routers stay high precision as in the Ultra recipe; routed experts (stacked
    parameters, not Linear modules) are not fake-quantized here. Returns the swapped module names."""
    from nemotron3.quant.fake_quant import FakeQuantConfig, FakeQuantLinear, high_precision_layers

    keep = high_precision_layers(len(model.backbone.layers))
    swapped = []
    for i, block in enumerate(model.backbone.layers):
        if i in keep or not isinstance(block.mixer, (Mamba2Mixer, MoE)):
            continue
        for name, module in list(block.mixer.named_modules()):
            if type(module) is not nn.Linear or module.in_features % 16 or module.out_features % 16:
                continue
            parent = block.mixer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block.mixer
            qcfg = FakeQuantConfig.nvfp4_pretraining(seed=seed + len(swapped))
            setattr(parent, name.rsplit(".", 1)[-1], FakeQuantLinear.from_linear(module, qcfg))
            swapped.append(f"backbone.layers.{i}.mixer.{name}")
    return swapped


def make_optimizer(model: nn.Module, cfg: PretrainConfig, foreach: bool = True) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices (≥ 2-D) only; norms, biases, A_log, D, dt_bias: none.

    foreach=False for sharded models: the multi-tensor kernels refuse a mix of FSDP DTensors and the plain
    tensors of rank-owned experts (the per-parameter loop gives the same numbers)."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and not keeps_fp32(n)]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and (p.dim() < 2 or keeps_fp32(n))]
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, foreach=foreach)


def make_schedule(cfg: PretrainConfig) -> WSDSchedule:
    o, steps = cfg.optim, cfg.run.steps
    decay = o.decay_steps or max(1, steps // 5)
    return WSDSchedule(o.lr, steps, min(o.warmup_steps, steps), min(decay, steps), o.min_lr, o.decay_shape, o.anneal_at)


# ------------------------------------------------------------------------------------------ spikes


@dataclass
class SpikeDetector:
    """Flags losses far above the recent ones: loss > median + threshold·σ and loss > (1 + min_rise)·median,
    with σ = 1.4826·MAD (median absolute deviation: a robust σ that earlier outliers or a falling loss do
    not inflate). A non-finite loss is always a spike. `patience` high losses in a row make a spike; a
    lone high loss is an unusual batch (packed mixtures of prose and synthetic tasks vary by 2× between
    batches), whose update is skipped instead."""

    config: SpikeSection
    history: list[float] = field(default_factory=list)
    streak: int = 0  # consecutive high losses so far

    def is_high(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return True
        if not self.config.enabled or len(self.history) < max(3, self.config.window // 2):
            return False
        med = statistics.median(self.history)
        mad = statistics.median(abs(x - med) for x in self.history)
        return loss > med + self.config.threshold * 1.4826 * mad and loss > (1 + self.config.min_rise) * med

    def check(self, loss: float) -> str:
        """'ok', 'skip' (a lone high loss: drop this batch) or 'spike' (roll back)."""
        if not self.is_high(loss):
            self.streak = 0
            return "ok"
        self.streak += 1
        if not math.isfinite(loss) or self.streak >= self.config.patience:
            self.streak = 0
            return "spike"
        return "skip"

    def accept(self, loss: float) -> None:
        self.history = (self.history + [loss])[-self.config.window :]


# ------------------------------------------------------------------------------------------ trainer


@dataclass
class StepResult:
    loss: float
    lm_loss: float
    mtp_loss: float | None
    aux_loss: float | None
    grad_norm: float
    tokens: int
    load_imbalance: float | None  # mean over routers of max expert load / mean expert load


class Pretrainer:
    """Builds everything a recipe describes and runs it: `Pretrainer(cfg).run()`."""

    def __init__(self, config: PretrainConfig, *, resume: bool = False, console: Console | None = None,
                 progress: bool = True) -> None:  # fmt: skip
        self.cfg = config
        self.out = Path(config.run.out_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.console = console or Console(stderr=True)
        self.show_progress = progress
        if config.run.threads > 0:
            torch.set_num_threads(config.run.threads)
        if not resume and list_checkpoints(self.ckpt_root):
            raise FileExistsError(
                f"{self.out} already holds checkpoints: pass --resume to continue that run, or choose another run.out_dir"
            )
        self.dist = init_distributed()  # torchrun → FSDP2 + expert parallel; otherwise one process
        self.world = self.dist.world_size
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
            self.data: PreparedData = self.load_data()  # rank 0 writes the cached files first
        self._barrier()
        if not self.dist.is_main:
            self.data = self.load_data()
        torch.manual_seed(config.run.seed + self.dist.rank)
        self.model_config, self.model = self.init_model()  # identical on every rank
        self.fake_quant = (
            apply_fake_quant(self.model, config.run.seed) if config.precision.fake_quant == "nvfp4" else []
        )
        if self.dist.distributed:
            reduce = DTYPES[config.precision.grad_reduce_dtype]
            shard_model(self.model, self.dist, expert_parallel=True, reduce_dtype=reduce)
        self.optimizer = make_optimizer(self.model, config, foreach=not self.dist.distributed)
        self.schedule = make_schedule(config)
        self.routers = routers(self.model)
        self.dataset = self.make_dataset()
        self.valid = self.make_validation()
        self.spikes = SpikeDetector(config.spike)
        self.step = 0  # the next optimizer step to run
        self.consumed = 0  # training batches taken from the data stream (rollbacks do not rewind it)
        self.lr_scale = 1.0
        self.rollbacks = 0
        self.injected = False
        self.tokens_seen = 0
        self.trace: list[dict[str, Any]] = []  # the metrics of every completed step, in order
        if resume and list_checkpoints(self.ckpt_root):
            self._restore(list_checkpoints(self.ckpt_root)[-1], rewind_data=True)
        self._batches = self._data_iterator()

    # ---- what a stage trains on (post-training stages such as nemotron3.train.sft override these) ----
    stage = "pretrain"  # the progress bar's and loss plot's name for the run

    def load_data(self) -> PreparedData:
        """Corpus, task files and tokenizer (with model.init_from and no data.tokenizer: the checkpoint's)."""
        data = self.cfg.data
        if self.cfg.model.init_from is not None and data.tokenizer is None:
            data = dataclasses.replace(data, tokenizer=str(resolve_model(self.cfg.model.init_from)))
        return prepare_data(data, self.out)

    def init_model(self) -> tuple[ModelConfig, NemotronHForCausalLM]:
        """The model to train: the recipe's architecture with seeded weights, or the checkpoint in
        model.init_from (its config.json fixes the architecture; fp32 master weights)."""
        cfg = self.cfg
        if cfg.model.init_from is None:
            config = build_model_config(cfg, self.data.tokenizer.vocab_size)
            return config, build_model(config, cfg.model.init_seed)
        from nemotron3.loader import load_model

        model = load_model(cfg.model.init_from, dtype=torch.float32)
        if model.config.vocab_size < self.data.tokenizer.vocab_size:
            raise ValueError(f"model.init_from {cfg.model.init_from}: vocabulary {model.config.vocab_size} is "
                             f"smaller than the tokenizer's {self.data.tokenizer.vocab_size}")  # fmt: skip
        for p in model.parameters():
            p.requires_grad_(True)
        return model.config, model.train()

    def make_dataset(self) -> Any:
        """The training stream: an iterable of [batch/world, seq_len] PackedBatches with
        state_dict(consumed=n) / load_state_dict (the loop counts consumed batches for exact resume)."""
        return train_dataset(self.data, self.cfg.data, self.dist.rank, self.world)

    def make_validation(self) -> list[PackedBatch]:
        """The fixed held-out batches `evaluate` scores (mean CE over their labelled positions)."""
        return validation_batches(self.data, self.cfg.data, self.cfg.micro_batch)

    # ---- state ----------------------------------------------------------------------------------
    def _loop_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "step": self.step, "consumed": self.consumed, "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks, "injected": self.injected, "tokens_seen": self.tokens_seen,
            "spike_history": self.spikes.history, "spike_streak": self.spikes.streak, "recipe": self.cfg.to_dict(),
        }  # fmt: skip

    def _barrier(self) -> None:
        if self.dist.distributed:
            torch.distributed.barrier()

    def _all_sum(self, values: list[float]) -> list[float]:
        """Sum `values` over ranks (identity in one process)."""
        if not self.dist.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.dist.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def save(self) -> Path:
        return save_training_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, self._loop_state(),
                                        self.cfg.run.keep_checkpoints, self.dist.rank, self.world)  # fmt: skip

    def _restore(self, path: Path, rewind_data: bool) -> None:
        """Load checkpoint `path`. A resume also rewinds the data stream; a spike rollback does not."""
        state = load_training_checkpoint(path, self.model, self.optimizer, self.dist.rank, self.world)
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"checkpoint {path} has state version {state.get('version')}, expected {STATE_VERSION}")
        ours = json.loads(json.dumps(self.cfg.to_dict()))  # as JSON stores it (tuples become lists)
        if rewind_data and state["recipe"] != ours:
            changed = sorted(k for k in ours if state["recipe"].get(k) != ours[k])
            raise ValueError(f"cannot resume {path}: the recipe differs from the checkpoint's in section(s) {changed}")
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.spikes.history, self.spikes.streak = list(state["spike_history"]), state["spike_streak"]
        if rewind_data:
            self.consumed, self.lr_scale = state["consumed"], state["lr_scale"]
            self.rollbacks, self.injected = state["rollbacks"], state["injected"]
            self._truncate_metrics(self.step)

    def _data_iterator(self) -> Iterator[PackedBatch]:
        self.dataset.load_state_dict(self.dataset.state_dict(consumed=self.consumed))
        return iter(self.dataset)

    # ---- one step -------------------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.precision.autocast == "bf16":
            return torch.autocast(device_type=self.model.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, batch: PackedBatch) -> StepResult:
        """Forward/backward over the micro-batches of `batch`, gradient reduction and clipping.

        Leaves the reduced, clipped gradients in `.grad` (no optimizer step: the caller decides after
        the spike test)."""
        cfg, model = self.cfg, self.model
        model.train()
        depths = cfg.mtp.depths if model.mtp is not None else 0
        counts = [int((batch.labels != IGNORE_INDEX).sum())]
        counts += [
            int((mtp_labels(batch.labels, batch.doc_ids, d) != IGNORE_INDEX).sum()) for d in range(1, depths + 1)
        ]
        n_lm, *n_mtp = (max(1, int(c)) for c in self._all_sum(counts))  # global label counts
        # FSDP averages gradients over ranks, so each rank's loss is W × its share of the global loss.
        reduce_dtype = DTYPES[cfg.precision.grad_reduce_dtype] if not self.dist.distributed else torch.float32
        accum: dict[nn.Parameter, torch.Tensor] = {}
        loads = [torch.zeros(r.weight.shape[0]) for r in self.routers]
        sums = {"lm": 0.0, "mtp": 0.0, "aux": 0.0}
        micro, total_b = cfg.micro_batch, batch.input_ids.shape[0]
        for start in range(0, total_b, micro):
            mb = PackedBatch(*(f[start : start + micro] for f in batch))
            valid = mb.doc_ids >= 0
            with self._autocast():
                out = model(mb.input_ids, doc_ids=mb.doc_ids, mtp_depths=depths)
                lm_sum, _ = token_cross_entropy(out.logits, mb.labels)
                loss = lm_sum / n_lm
                sums["lm"] += float(lm_sum.detach()) / n_lm
                if depths:
                    for d, (s, _) in enumerate(mtp_losses(out.mtp_logits, mb.labels, mb.doc_ids)):
                        loss = loss + cfg.mtp.loss_weight / depths * s / n_mtp[d]
                        sums["mtp"] += float(s.detach()) / n_mtp[d] / depths
                if cfg.moe.seq_aux_loss_coef > 0 and self.routers:
                    aux = sum(sequence_aux_loss(r, tuple(mb.input_ids.shape), valid) for r in self._routed())
                    share = mb.input_ids.shape[0] / (total_b * self.world)  # of the global batch's sequences
                    loss = loss + cfg.moe.seq_aux_loss_coef * share * aux
                    sums["aux"] += float(aux.detach()) * share
            (loss * self.world if self.world > 1 else loss).backward()
            for i, r in enumerate(self.routers):
                if getattr(r, "last_indices", None) is not None:
                    loads[i] += expert_load(r, valid)
                    r.last_indices = r.last_scores = None
            if reduce_dtype != torch.float32:  # sum the partial gradients in bf16, as a bf16 all-reduce would
                for p in model.parameters():
                    if p.grad is not None:
                        accum[p] = (accum[p].float() + p.grad if p in accum else p.grad).to(reduce_dtype)
                        p.grad = None
        for p, g in accum.items():
            p.grad = g.float()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        if self.dist.distributed:  # global norm over FSDP shards and rank-owned experts
            grad_norm = float(distributed_clip_grad_norm_(model, clip))
            loads = list(sync_expert_load(torch.stack(loads)).unbind(0)) if loads else loads
        else:
            params = [p for p in model.parameters() if p.grad is not None]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        sums["lm"], sums["mtp"], sums["aux"], n_tokens = self._all_sum(
            [sums["lm"], sums["mtp"], sums["aux"], float((batch.doc_ids >= 0).sum())]
        )
        self._loads = loads
        imbalance = [float(ld.max() / ld.mean()) for ld in loads if ld.sum() > 0]
        total = sums["lm"] + cfg.mtp.loss_weight * sums["mtp"] + cfg.moe.seq_aux_loss_coef * sums["aux"]
        return StepResult(
            loss=total, lm_loss=sums["lm"], mtp_loss=sums["mtp"] if depths else None,
            aux_loss=sums["aux"] if cfg.moe.seq_aux_loss_coef > 0 and self.routers else None,
            grad_norm=grad_norm, tokens=int(n_tokens),
            load_imbalance=sum(imbalance) / len(imbalance) if imbalance else None,
        )  # fmt: skip

    def _routed(self) -> list:
        """Routers that ran in the current forward (MTP routers only run when the MTP loss does)."""
        return [r for r in self.routers if getattr(r, "last_indices", None) is not None]

    def _apply_update(self) -> float:
        lr = self.schedule(self.step) * self.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.moe.bias_update_rate > 0:
            for r, load in zip(self.routers, self._loads):
                if load.sum() > 0:
                    update_expert_bias(r, load, self.cfg.moe.bias_update_rate)
        return lr

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token CE (nats/token) over the fixed held-out sequences."""
        self.model.eval()
        total, count = 0.0, 0
        for batch in self.valid:
            with self._autocast():
                logits = self.model(batch.input_ids, doc_ids=batch.doc_ids).logits
            s, n = token_cross_entropy(logits, batch.labels)
            total, count = total + float(s), count + n
        return total / max(count, 1)

    # ---- the loop -------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to `run.steps` (or stop before step `stop_after`, to simulate an interruption).

        Returns a summary: final step, losses, validation loss, rollbacks, tokens and time."""
        cfg = self.cfg
        if self.step == 0 and not list_checkpoints(self.ckpt_root):
            self.save()  # the rollback target before the first scheduled checkpoint
        end = cfg.run.steps if stop_after is None else min(stop_after, cfg.run.steps)
        started, valid_loss = time.perf_counter(), None
        with self._progress() as progress:
            task = progress.add_task(self.stage, total=cfg.run.steps, completed=self.step, info="")
            while self.step < end:
                batch = next(self._batches)
                self.consumed += 1
                if cfg.spike.inject_at is not None and self.step == cfg.spike.inject_at and not self.injected:
                    self._inject_spike()
                t0 = time.perf_counter()
                result = self.train_step(batch)
                verdict = self.spikes.check(result.loss)
                if verdict != "ok":
                    if verdict == "spike":
                        self._rollback(result)
                    else:
                        self.optimizer.zero_grad(set_to_none=True)
                        self._log({"event": "skipped_batch", "at_step": self.step, "loss": result.loss})
                    progress.update(task, completed=self.step)
                    continue
                lr = self._apply_update()
                self.spikes.accept(result.loss)
                self.tokens_seen += result.tokens
                record = {"step": self.step, "loss": result.loss, "lm_loss": result.lm_loss, "mtp_loss": result.mtp_loss,
                          "aux_loss": result.aux_loss, "lr": lr, "grad_norm": result.grad_norm,
                          "load_imbalance": result.load_imbalance, "tokens": self.tokens_seen,
                          "tok_per_s": result.tokens / (time.perf_counter() - t0)}  # fmt: skip
                self.step += 1
                if self.step % cfg.run.eval_every == 0 or self.step == cfg.run.steps:
                    valid_loss = record["valid_loss"] = self.evaluate()
                self.trace.append(record)
                if self.step % cfg.run.log_every == 0 or "valid_loss" in record:
                    self._log(record)
                if self.step % cfg.run.checkpoint_every == 0 or self.step == cfg.run.steps:
                    self.save()
                progress.update(task, completed=self.step, info=f"loss {result.loss:.3f} lr {lr:.2e} "
                                f"{record['tok_per_s']:.0f} tok/s")  # fmt: skip
        summary = {"step": self.step, "final_loss": self.trace[-1]["loss"] if self.trace else None,
                   "valid_loss": valid_loss, "rollbacks": self.rollbacks, "tokens": self.tokens_seen,
                   "seconds": time.perf_counter() - started, "fake_quant_layers": len(self.fake_quant)}  # fmt: skip
        if self.step >= cfg.run.steps:
            summary["model_dir"] = str(self.export())
            if self.dist.is_main:
                self.plot()
                (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    def _progress(self) -> Progress:
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), TimeRemainingColumn()]  # fmt: skip
        return Progress(*columns, console=self.console, disable=not self.show_progress or not self.dist.is_main)

    def _inject_spike(self) -> None:
        """Testing aid: scale every matrix by 30 so the next losses are a genuine spike."""
        self.injected = True
        with torch.no_grad():
            for p in self.model.parameters():
                if p.dim() >= 2:
                    p.mul_(30.0)

    def _rollback(self, result: StepResult) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.rollbacks >= self.cfg.spike.max_rollbacks:
            raise RuntimeError(f"loss spike at step {self.step} (loss {result.loss:.4g}) after "
                               f"{self.rollbacks} rollbacks (spike.max_rollbacks): giving up")  # fmt: skip
        target = list_checkpoints(self.ckpt_root)[-1]
        self.rollbacks += 1
        self.lr_scale *= self.cfg.spike.lr_factor
        event = {
            "event": "rollback",
            "at_step": self.step,
            "loss": result.loss,
            "to": target.name,
            "lr_scale": self.lr_scale,
        }
        self._restore(target, rewind_data=False)
        event["resumed_step"] = self.step
        self.trace = [r for r in self.trace if r["step"] < self.step]
        self._log(event)
        if self.dist.is_main:
            self.console.print(f"[yellow]loss spike {result.loss:.4g} at step {event['at_step']}: rolled back to "
                               f"{target.name}, lr scale {self.lr_scale:g}[/yellow]")  # fmt: skip

    # ---- outputs --------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """On resume, drop logged steps at or after `step` (they will be redone)."""
        path = self.out / "metrics.jsonl"
        if path.is_file():
            keep = [line for line in path.read_text().splitlines() if json.loads(line).get("step", -1) < step]
            path.write_text("".join(line + "\n" for line in keep))

    def plot(self) -> Path | None:
        """loss.png: training loss (and MTP loss) and validation loss against step, LR on a twin axis."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.console.print("matplotlib is not installed: no loss.png (pip install matplotlib)")
            return None
        rows = [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "loss" in r and "event" not in r]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.plot([r["step"] for r in steps], [r["lm_loss"] for r in steps], lw=1, label="train LM loss")
        if any(r.get("mtp_loss") is not None for r in steps):
            ax.plot([r["step"] for r in steps], [r["mtp_loss"] for r in steps], lw=1, alpha=0.7, label="train MTP loss")
        evals = [r for r in steps if "valid_loss" in r]
        ax.plot([r["step"] for r in evals], [r["valid_loss"] for r in evals], "o-", label="validation loss")
        for r in rows:
            if r.get("event") == "rollback":
                ax.axvline(r["at_step"], color="red", ls=":", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in steps], [r["lr"] for r in steps], color="gray", lw=0.8, ls="--")
        ax2.set_ylabel("learning rate", color="gray")
        ax.legend(loc="upper right")
        ax.set_title(f"{self.stage} {self.out.name}")
        fig.tight_layout()
        path = self.out / "loss.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def export(self) -> Path:
        """Write the trained model (nemotron_h format) with its tokenizer into run.export_dir."""
        target = Path(self.cfg.run.export_dir) if self.cfg.run.export_dir else self.out / "model"
        # FakeQuantLinear keeps nn.Linear's weight/bias names, so the state is a plain model's. Sharded
        # (FSDP / expert-parallel) weights are gathered into full tensors first: a collective.
        full = gather_full_state_dict(self.model) if self.dist.distributed else self.model.state_dict()
        if not self.dist.is_main:
            return target
        dtype = DTYPES[self.cfg.run.export_dtype]
        state = {n: (t.detach().to(torch.float32 if keeps_fp32(n) else dtype) if t.is_floating_point() else t)
                 for n, t in full.items()}  # fmt: skip
        save_checkpoint(
            state,
            self.model_config.replace(extra={**self.model_config.extra, "torch_dtype": self.cfg.run.export_dtype}),
            target,
        )
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(self.data.tokenizer_dir / name, target / name)
        return target


def run_to_end(trainer_cls: type[Pretrainer], config: PretrainConfig, *, resume: bool = False,
               progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Build `trainer_cls(config)` and run it to the end (resuming if asked); returns the summary.

    Under torchrun every rank calls this; the process group is left once the trainer is gone."""
    trainer = trainer_cls(config, resume=resume, progress=progress)
    summary = trainer.run()
    distributed = trainer.dist.distributed
    del trainer
    if distributed:
        destroy_distributed()
    return summary


def pretrain(config: PretrainConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run a pretraining recipe to the end (resuming from its last checkpoint if asked); returns the summary."""
    return run_to_end(Pretrainer, config, resume=resume, progress=progress)
