"""Shared pieces of the evaluations: model specs, task options, scored greedy generation, seed statistics.

Every evaluation decodes greedily on fresh task instances: seed `i` of an evaluation is `EVAL_SEED + i`
(nemotron3.train.evaluate), a seed no training recipe uses. Generation goes through
`generate_with_budget` (nemotron3.engine.reasoning), which batches all prompts into one `LLM.generate`
call when there is no budget and counts reasoning tokens (the `<think>` span, closing tag included).
"""

from __future__ import annotations

import gc
import statistics
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nemotron3.default_model import resolve_model
from nemotron3.engine.reasoning import ReasoningConfig, generate_with_budget
from nemotron3.engine.sampling_params import SamplingParams
from nemotron3.train.evaluate import EVAL_SEED, task_prompt
from nemotron3.train.tasks import DOMAINS, TaskInstance, verify
from nemotron3.train.tokenizer import render_chat


def eval_seeds(count: int) -> list[int]:
    """The instance seeds of an evaluation with `count` seeds: EVAL_SEED, EVAL_SEED + 1, ..."""
    if count < 1:
        raise ValueError(f"seeds must be >= 1, got {count}")
    return [EVAL_SEED + i for i in range(count)]


# ---- models ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: its display `label` and checkpoint `path` ("default" = the embedded model)."""

    label: str
    path: str

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        """`LABEL=PATH` or `PATH` (label: the directory's name, or "default")."""
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = "", spec
        if (sep and not label.strip()) or not path.strip():
            raise ValueError(f"--model expects LABEL=PATH or PATH, got {spec!r}")
        path = path.strip()
        return cls(label.strip() or Path(path).name or path, path)

    def directory(self) -> Path:
        """The checkpoint directory; raises ValueError when it is not one with config.json and tokenizer.json."""
        try:
            d = Path(resolve_model(self.path))
        except FileNotFoundError as e:
            raise ValueError(f"--model {self.label}={self.path}: {e}") from None
        missing = [f for f in ("config.json", "tokenizer.json") if not (d / f).is_file()]
        if missing:
            raise ValueError(f"--model {self.label}={self.path}: {d} is not a checkpoint directory with "
                             f"{' and '.join(missing)}")  # fmt: skip
        return d


def parse_models(specs: Sequence[str | ModelSpec]) -> list[ModelSpec]:
    """ModelSpecs from `LABEL=PATH` strings; labels must be unique and at least one model given."""
    models = [s if isinstance(s, ModelSpec) else ModelSpec.parse(s) for s in specs]
    if not models:
        raise ValueError("give at least one --model")
    labels = [m.label for m in models]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"--model labels must be unique; repeated: {dup} (name them LABEL=PATH)")
    return models


@contextmanager
def open_llm(spec: ModelSpec, **engine_options: Any) -> Iterator[Any]:
    """One LLM for `spec` (greedy evaluations build one per model), freed when the block ends."""
    from nemotron3.engine.llm import LLM

    llm = LLM(str(spec.directory()), **engine_options)
    try:
        yield llm
    finally:
        del llm
        gc.collect()


# ---- task options ---------------------------------------------------------------------------------------
def load_task_options(path: str | Path) -> dict[str, dict[str, Any]]:
    """The per-domain generator options of a recipe: `data.task_options` (SFT/pretraining recipes) or
    `rollout.task_options` (RL/MOPD recipes); a file holding just {domain: options} works too."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--task-options: {path} is not a file")
    text = path.read_text(encoding="utf-8")
    raw = tomllib.loads(text) if path.suffix == ".toml" else (yaml.safe_load(text) or {})
    if not isinstance(raw, dict):
        raise ValueError(f"--task-options: {path} does not hold a mapping")  # noqa: TRY004  (a usage error)
    for section in ("data", "rollout"):
        if isinstance(raw.get(section), dict) and "task_options" in raw[section]:
            raw = raw[section]["task_options"] or {}
            break
    return check_task_options(raw, f"--task-options {path}")


def set_task_option(options: dict[str, dict[str, Any]], assignment: str) -> dict[str, dict[str, Any]]:
    """Apply `DOMAIN.KEY=VALUE` (value parsed as YAML, e.g. `arithmetic.digits=[1,2]`) to a copy of `options`."""
    key, sep, value = assignment.partition("=")
    domain, dot, name = key.partition(".")
    if not sep or not dot or not domain or not name:
        raise ValueError(f"--set-option expects DOMAIN.KEY=VALUE, got {assignment!r}")
    out = {d: dict(o) for d, o in options.items()}
    out.setdefault(domain.strip(), {})[name.strip()] = yaml.safe_load(value)
    return check_task_options(out, "--set-option")


def check_task_options(options: Any, where: str) -> dict[str, dict[str, Any]]:
    """Options must map known domains to mappings."""
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise ValueError(f"{where}: task options must map domains to option mappings")
    bad = sorted(set(options) - set(DOMAINS))
    if bad:
        raise ValueError(f"{where}: unknown domain(s) {bad}; choose from {list(DOMAINS)}")
    return {d: dict(o) for d, o in options.items()}


def check_domain(domain: str) -> str:
    """`domain` itself, or a ValueError naming the known domains."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose from {list(DOMAINS)}")
    return domain


# ---- scored generation ----------------------------------------------------------------------------------
def render_prompt(instance: TaskInstance, thinking: bool) -> str:
    """The chat-template generation prompt: thinking on (`task_prompt`, ends `<think>\\n`) or off (`<think></think>`)."""
    if thinking:
        return task_prompt(instance)
    messages = [m for m in instance.as_messages() if m["role"] in ("system", "user")][:2]
    return render_chat(messages, tools=instance.tools or None, add_generation_prompt=True, enable_thinking=False)


@dataclass
class Scored:
    """One greedy output: its text, whether it verified, completion and reasoning token counts."""

    text: str
    correct: bool
    completion_tokens: int
    reasoning_tokens: int


def run_instances(
    llm: Any, instances: Sequence[TaskInstance], *, thinking: bool, max_tokens: int, budget: int | None = None
) -> list[Scored]:
    """Greedy outputs for `instances`, all in one batched generation (two phases when a budget cuts
    thinking), each checked with its domain's verifier."""
    tok = llm.get_tokenizer()
    if tok is None:
        raise ValueError("the evaluations need a checkpoint with tokenizer.json")
    prompts = [tok.encode(render_prompt(x, thinking)) for x in instances]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs = generate_with_budget(llm, prompts, params, ReasoningConfig(thinking, budget if thinking else None),
                                in_reasoning=thinking)  # fmt: skip
    return [Scored(o[0].text, verify(x, o[0].text), len(o[0].token_ids), o[0].reasoning_tokens)
            for x, o in zip(instances, outs)]  # fmt: skip


def examples(instances: Sequence[TaskInstance], scored: Sequence[Scored], k: int = 2) -> list[dict[str, Any]]:
    """The first `k` (prompt, gold, output, correct) records, for reading what the model did."""
    return [{"prompt": x.prompt, "gold": x.answer, "output": s.text, "correct": s.correct}
            for x, s in list(zip(instances, scored))[:k]]  # fmt: skip


# ---- statistics -----------------------------------------------------------------------------------------
def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (0.0 for no values)."""
    return float(statistics.fmean(values)) if values else 0.0


def std(values: Sequence[float]) -> float:
    """Sample standard deviation over seeds (0.0 with fewer than two)."""
    return float(statistics.stdev(values)) if len(values) > 1 else 0.0


def parse_int_list(spec: str, flag: str, *, minimum: int = 1) -> list[int]:
    """`256,512` -> [256, 512]; ValueError naming `flag` for a non-integer or a value below `minimum`."""
    try:
        values = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} expects comma-separated integers, got {spec!r}") from None
    if not values or any(v < minimum for v in values):
        raise ValueError(f"{flag} values must be integers >= {minimum}, got {spec!r}")
    return values
