"""`nemotron3 train sft`: chat-formatted supervised fine-tuning with the Nemotron 3 reasoning-mode data.

Data. Every training document is one synthetic task conversation (nemotron3.train.tasks) rendered with the
chat template (nemotron3.train.tokenizer.render_chat, reasoning kept in every assistant turn) and
tokenized piece by piece: the text outside assistant turns (system, user, tool results, the
`<|im_start|>assistant\\n` headers, the newline after each `<|im_end|>`) is context; each assistant turn's
body — its `<think>` span, content, tool calls and the closing `<|im_end|>` — is trained on. The labels
of a sequence are next-token labels kept only where the *next* token is an assistant-turn token:
`labels[t] = ids[t + 1]` if token t+1 is trainable, else -100, so the loss is the cross-entropy of the
assistant tokens given everything before them. Conversations are packed whole (never split) into
`data.seq_len` sequences with `doc_ids`, so attention and the Mamba state never cross from one
conversation into the next (the same document masking as pretraining); a conversation longer than
`seq_len` is dropped and counted.

Reasoning modes (the mode-control data of the real model), chosen per conversation with a seeded RNG:
- "full" (the rest): the complete reasoning trace in `<think>\\n...\\n</think>\\n`, then the answer;
- "off" (`sft.thinking_off_fraction`): no reasoning, the turn starts with an empty `<think></think>` —
  what the template's generation prompt writes with `enable_thinking=False`;
- "truncated" (`sft.truncated_fraction`): the trace cut after a uniformly random number of its tokens
  (at least one, at least one left out), then the closing `\\n</think>\\n` exactly as the engine's
  thinking budget injects it (nemotron3.engine.reasoning.CLOSE_TEXT, tokenized on its own as the engine
  does), then the gold answer. The forced close is context, not a target (the model must not learn to
  stop thinking mid-sentence on its own); the reasoning before it and the answer after it are targets.

Training reuses the pretraining loop unchanged: `SFTTrainer` is a `Pretrainer` whose model starts from
`model.init_from` (default: the embedded model) with its tokenizer, whose training stream is the packed
SFT sequences (reshuffled every epoch; resumable), and whose validation loss is the assistant-token loss
on held-out conversations. Loss terms, MTP (its targets are the same masked labels shifted), MoE
balancing, spike guard, checkpoints, exact resume, metrics and the nemotron_h export are the
Pretrainer's.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nemotron3.default_model import resolve_model
from nemotron3.io.tokenizer import Tokenizer
from nemotron3.train.config import DataSection, ModelSection, OptimSection, PretrainConfig, RunSection
from nemotron3.train.data import IGNORE_INDEX, PackedBatch, stack
from nemotron3.train.evaluate import EVAL_SEED, task_accuracy
from nemotron3.train.losses import token_cross_entropy
from nemotron3.train.prepare import VALID_SEED_OFFSET, PreparedData
from nemotron3.train.pretrain import Pretrainer
from nemotron3.train.tasks import TaskInstance, generate, verify
from nemotron3.train.tokenizer import IM_END, PAD_ID, render_chat

MODES = ("full", "off", "truncated")
ASSISTANT_HEADER = "<|im_start|>assistant\n"
CLOSE_TEXT = "\n</think>\n"
"""The end of a reasoning span as the chat template writes it and the engine's budget injects it."""
STATE_VERSION = 1


# ------------------------------------------------------------------------------------------ recipe


@dataclass
class SFTSection:
    thinking_off_fraction: float = 0.1  # conversations rendered with an empty <think></think> (thinking off)
    truncated_fraction: float = 0.1  # conversations whose trace is cut at random, closed, then answered
    valid_documents: int = 96  # held-out conversations (same domains and mode mix, another seed) scored at eval
    system: str | None = None  # an optional system prompt for every conversation


@dataclass
class SFTModelSection(ModelSection):
    init_from: str | None = "base"  # the embedded pretrained model; a directory; null = the preset, random


@dataclass
class SFTDataSection(DataSection):
    corpus_dir: str | None = None  # SFT reads no corpus: the documents are task conversations
    task_documents: int = 2000
    task_domains: list[str] = field(default_factory=lambda: ["arithmetic", "sorting", "tool_use", "retrieval"])
    seq_len: int = 512  # conversations are packed whole: long enough for the longest one
    shuffle_buffer: int = 1  # unused: the packed sequences are reshuffled whole every epoch


@dataclass
class SFTOptimSection(OptimSection):
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10


@dataclass
class SFTRunSection(RunSection):
    out_dir: str = "runs/sft"


@dataclass
class SFTConfig(PretrainConfig):
    """A PretrainConfig (same sections, same loop) with SFT defaults and the `sft` section."""

    model: ModelSection = field(default_factory=SFTModelSection)
    data: DataSection = field(default_factory=SFTDataSection)
    optim: OptimSection = field(default_factory=SFTOptimSection)
    run: RunSection = field(default_factory=SFTRunSection)
    sft: SFTSection = field(default_factory=SFTSection)

    def _data_check(self) -> tuple[bool, str]:
        d, s = self.data, self.sft
        checks = [
            (d.corpus_dir is None and not d.train_files and not d.valid_files,
             "SFT trains on task conversations only: leave data.corpus_dir, train_files and valid_files unset"),
            (d.task_documents > 0 and bool(d.task_domains), "SFT needs data.task_documents > 0 and data.task_domains"),
            (0 <= s.thinking_off_fraction and 0 <= s.truncated_fraction
             and s.thinking_off_fraction + s.truncated_fraction <= 1,
             "sft.thinking_off_fraction and sft.truncated_fraction must be >= 0 with a sum <= 1"),
            (s.valid_documents >= 1, "sft.valid_documents must be >= 1"),
            (d.tokenizer is not None or self.model.init_from is not None,
             "SFT needs a tokenizer with the chat template: set model.init_from or data.tokenizer"),
        ]  # fmt: skip
        return next(((False, m) for ok, m in checks if not ok), (True, ""))


# ------------------------------------------------------------------------------------------ examples


@dataclass
class SFTExample:
    """One tokenized conversation: `ids`, and `trainable[i]` True where token i is an assistant-turn token."""

    ids: list[int]
    trainable: list[bool]
    domain: str = ""
    mode: str = "full"

    @property
    def labels(self) -> list[int]:
        """Next-token labels: ids[t + 1] where token t+1 is trainable, else -100 (the last position: -100)."""
        nxt = [(i if ok else IGNORE_INDEX) for i, ok in zip(self.ids[1:], self.trainable[1:])]
        return nxt + [IGNORE_INDEX]


def conversation_segments(messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[tuple[str, bool]]:
    """The chat-template text of `messages` as (text, trainable) pieces, in order; joined they are exactly
    `render_chat(messages, tools=tools, truncate_history_thinking=False)`.

    Trainable pieces are the assistant turns' bodies: from after `<|im_start|>assistant\\n` through their
    `<|im_end|>`. A forced close (an assistant message with `"forced_close": True`, see `truncate`) is cut
    out of its body as a context piece.
    """
    text = render_chat(messages, tools=tools, truncate_history_thinking=False)
    forced = [bool(m.get("forced_close")) for m in messages if m["role"] == "assistant"]
    segments: list[tuple[str, bool]] = []
    pos, turn = 0, 0
    while (start := text.find(ASSISTANT_HEADER, pos)) >= 0:
        body = start + len(ASSISTANT_HEADER)
        end = text.index(IM_END, body) + len(IM_END)
        segments.append((text[pos:body], False))
        if turn < len(forced) and forced[turn]:
            cut = text.index(CLOSE_TEXT, body)
            segments += [(text[body:cut], True), (CLOSE_TEXT, False), (text[cut + len(CLOSE_TEXT) : end], True)]
        else:
            segments.append((text[body:end], True))
        pos, turn = end, turn + 1
    segments.append((text[pos:], False))
    return [(s, t) for s, t in segments if s]


def tokenize_segments(tokenizer: Any, segments: Sequence[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Encode each piece on its own (pieces meet at added tokens or at the forced close, which the engine
    also encodes on its own) and mark every token of a trainable piece."""
    ids: list[int] = []
    trainable: list[bool] = []
    for text, ok in segments:
        piece = tokenizer.encode(text)
        piece = list(getattr(piece, "ids", piece))
        ids += piece
        trainable += [ok] * len(piece)
    return ids, trainable


def thinking_off(messages: Sequence[dict]) -> list[dict]:
    """The conversation with every assistant turn's reasoning removed (rendered `<think></think>`)."""
    return [{**m, "reasoning_content": ""} if m["role"] == "assistant" else dict(m) for m in messages]


def truncate(messages: Sequence[dict], tokenizer: Any, rng: random.Random) -> list[dict]:
    """The conversation with each reasoning trace cut after k of its n tokens, k uniform in [1, n - 1]
    (a one-token trace is kept whole), and marked `forced_close` so its `\\n</think>\\n` is context."""
    out = []
    for m in messages:
        reasoning = m.get("reasoning_content") or ""
        if m["role"] != "assistant" or not reasoning.strip():
            out.append(dict(m))
            continue
        encoded = tokenizer.encode(reasoning)
        ids = list(getattr(encoded, "ids", encoded))
        k = rng.randint(1, len(ids) - 1) if len(ids) > 1 else len(ids)
        prefix = tokenizer.decode(ids[:k], skip_special_tokens=False)
        if not prefix.strip():  # a cut inside leading whitespace would render as thinking off
            prefix = tokenizer.decode(ids[: max(k, 2)], skip_special_tokens=False)
        out.append({**m, "reasoning_content": prefix, "forced_close": True})
    return out


def build_examples(
    tokenizer: Any,
    domains: Sequence[str],
    count: int,
    seed: int,
    options: dict[str, dict] | None = None,
    *,
    thinking_off_fraction: float = 0.0,
    truncated_fraction: float = 0.0,
    system: str | None = None,
) -> list[SFTExample]:
    """`count` conversations cycling through `domains` (a repeated domain gets a larger share, distinct
    instances, as the pretraining task mix), each in a mode drawn from the fractions; tokenized."""
    options = options or {}
    cycle = [domains[i % len(domains)] for i in range(count)]
    pools = {d: iter(generate(d, cycle.count(d), seed, **options.get(d, {}))) for d in dict.fromkeys(cycle)}
    rng = random.Random(f"{seed}/sft-modes")
    examples = []
    for domain in cycle:
        instance: TaskInstance = next(pools[domain])
        messages = instance.as_messages(system)
        u = rng.random()
        if u < thinking_off_fraction:
            mode, messages = "off", thinking_off(messages)
        elif u < thinking_off_fraction + truncated_fraction and instance.reasoning.strip():
            mode, messages = "truncated", truncate(messages, tokenizer, rng)
        else:
            mode = "full"
        ids, trainable = tokenize_segments(tokenizer, conversation_segments(messages, instance.tools or None))
        examples.append(SFTExample(ids, trainable, domain, mode))
    return examples


def pack_examples(
    examples: Sequence[SFTExample], seq_len: int, pad_id: int = PAD_ID, *, open_sequences: int = 16
) -> tuple[list[PackedBatch], int]:
    """Pack whole conversations into `seq_len` sequences, first fit: each goes into the first of the last
    `open_sequences` sequences with room for it, else starts a new one (deterministic; fills ~95 % where
    one-after-another packing fills ~75 %). The rest is padding: id `pad_id`, label -100, doc_id and
    position -1. Returns (sequences, number of conversations longer than seq_len, dropped)."""
    bins: list[list[SFTExample]] = []
    room: list[int] = []
    dropped = 0
    for ex in examples:
        n = len(ex.ids)
        if n > seq_len:
            dropped += 1
            continue
        for j in range(max(0, len(bins) - open_sequences), len(bins)):
            if room[j] >= n:
                bins[j].append(ex)
                room[j] -= n
                break
        else:
            bins.append([ex])
            room.append(seq_len - n)
    return [_pack_one(rows, seq_len, pad_id) for rows in bins], dropped


def _pack_one(rows: Sequence[SFTExample], seq_len: int, pad_id: int) -> PackedBatch:
    """One [seq_len] PackedBatch holding `rows` one after another (doc_ids 0, 1, ...), then padding."""
    ids, labels, docs, pos = [], [], [], []
    for j, ex in enumerate(rows):
        ids += ex.ids
        labels += ex.labels
        docs += [j] * len(ex.ids)
        pos += list(range(len(ex.ids)))
    fill = seq_len - len(ids)

    def t(xs: list[int]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.long)

    return PackedBatch(t(ids + [pad_id] * fill), t(labels + [IGNORE_INDEX] * fill), t(docs + [-1] * fill),
                       t(pos + [-1] * fill))  # fmt: skip


class SFTDataset:
    """The packed SFT sequences as an endless stream of [batch_size / world_size, T] batches.

    The packing is fixed; each epoch visits the sequences in a seeded order (`f"{seed}/{epoch}/sft"`), in
    complete global batches (a last partial batch is dropped), rank r taking rows [r·b, (r+1)·b) of each.
    `state_dict(consumed=n)` / `load_state_dict` give the Pretrainer loop its exact resume.
    """

    def __init__(self, sequences: Sequence[PackedBatch], batch_size: int, seed: int = 0, *, rank: int = 0,
                 world_size: int = 1) -> None:  # fmt: skip
        if batch_size % world_size:
            raise ValueError(f"data.batch_size {batch_size} must be divisible by the world size {world_size}")
        if len(sequences) < batch_size:
            raise ValueError(f"{len(sequences)} packed SFT sequences cannot fill one batch of {batch_size}: "
                             "raise data.task_documents or lower data.batch_size")  # fmt: skip
        self.sequences, self.batch_size, self.seed = list(sequences), batch_size, seed
        self.rank, self.world_size = rank, world_size
        self._epoch, self._index = 0, 0
        digest = hashlib.sha256()
        for s in self.sequences:
            digest.update(s.input_ids.numpy().tobytes())
            digest.update(s.labels.numpy().tobytes())
        self._digest = digest.hexdigest()[:16]

    def items_per_epoch(self) -> int:
        return len(self.sequences) // self.batch_size

    def state_dict(self, consumed: int | None = None) -> dict:
        epoch, index = (self._epoch, self._index) if consumed is None else divmod(consumed, self.items_per_epoch())
        return {"version": STATE_VERSION, "epoch": epoch, "index": index, "config": self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"SFT data state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state.get("config") != self._fingerprint():
            raise ValueError("SFT data state was saved with different data (sequences, batch, seed or ranks)")
        self._epoch, self._index = int(state["epoch"]), int(state["index"])

    def __iter__(self):
        per_rank = self.batch_size // self.world_size
        while True:
            order = list(range(len(self.sequences)))
            random.Random(f"{self.seed}/{self._epoch}/sft").shuffle(order)
            while self._index < self.items_per_epoch():
                rows = order[self._index * self.batch_size : (self._index + 1) * self.batch_size]
                mine = rows[self.rank * per_rank : (self.rank + 1) * per_rank]
                self._index += 1
                yield stack([self.sequences[i] for i in mine])
            self._epoch, self._index = self._epoch + 1, 0

    def _fingerprint(self) -> dict:
        return {"sequences": len(self.sequences), "digest": self._digest, "batch_size": self.batch_size,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size}  # fmt: skip


# ------------------------------------------------------------------------------------------ trainer


def data_stats(examples: Sequence[SFTExample], sequences: Sequence[PackedBatch], dropped: int) -> dict[str, Any]:
    """Counts per domain and mode, tokens, trainable tokens and packing efficiency."""
    by: dict[str, dict[str, int]] = {}
    for ex in examples:
        by.setdefault(ex.domain, {m: 0 for m in MODES})[ex.mode] += 1
    tokens = sum(int((s.doc_ids >= 0).sum()) for s in sequences)
    slots = len(sequences) * (sequences[0].input_ids.numel() if sequences else 0)
    return {"conversations": len(examples), "dropped_too_long": dropped, "by_domain_and_mode": by,
            "tokens": tokens, "trained_tokens": sum(int((s.labels != IGNORE_INDEX).sum()) for s in sequences),
            "sequences": len(sequences), "packing_fill": tokens / slots if slots else 0.0}  # fmt: skip


class SFTTrainer(Pretrainer):
    """The Pretrainer loop on SFT data: starts from model.init_from (or the preset, seeded), trains on the
    packed assistant-masked conversations and reports the held-out assistant-token loss."""

    stage = "sft"
    cfg: SFTConfig

    def __init__(self, config: SFTConfig, **kwargs) -> None:
        if not isinstance(config, SFTConfig):
            raise TypeError("SFTTrainer takes an SFTConfig (SFTConfig.from_file / from_dict)")
        super().__init__(config, **kwargs)

    def load_data(self) -> PreparedData:
        """The tokenizer (data.tokenizer, else the init checkpoint's) and the training conversations."""
        source = self.cfg.data.tokenizer or resolve_model(self.cfg.model.init_from)
        tokenizer_dir = Path(source).expanduser()
        tokenizer = Tokenizer.from_dir(tokenizer_dir)
        d, s = self.cfg.data, self.cfg.sft
        kwargs = {"thinking_off_fraction": s.thinking_off_fraction, "truncated_fraction": s.truncated_fraction,
                  "system": s.system}  # fmt: skip
        train = build_examples(tokenizer, d.task_domains, d.task_documents, d.seed, d.task_options, **kwargs)
        valid = build_examples(tokenizer, d.task_domains, s.valid_documents, d.seed + VALID_SEED_OFFSET,
                               d.task_options, **kwargs)  # fmt: skip
        self.train_sequences, dropped = pack_examples(train, d.seq_len)
        self.valid_sequences, valid_dropped = pack_examples(valid, d.seq_len)
        self.data_stats = {"train": data_stats(train, self.train_sequences, dropped),
                           "valid": data_stats(valid, self.valid_sequences, valid_dropped)}  # fmt: skip
        if self.dist.is_main:
            (self.out / "data").mkdir(parents=True, exist_ok=True)
            (self.out / "data" / "sft_stats.json").write_text(json.dumps(self.data_stats, indent=1) + "\n")
            samples = [{"domain": ex.domain, "mode": ex.mode,
                        "segments": _segments_text(tokenizer, ex)} for ex in _one_per_kind(train)]  # fmt: skip
            (self.out / "data" / "sft_samples.json").write_text(json.dumps(samples, indent=1) + "\n")
        return PreparedData(tokenizer, tokenizer_dir, [], [])

    def make_dataset(self) -> SFTDataset:
        return SFTDataset(self.train_sequences, self.cfg.data.batch_size, self.cfg.data.seed,
                          rank=self.dist.rank, world_size=self.world)  # fmt: skip

    def make_validation(self) -> list[PackedBatch]:
        seqs, b = self.valid_sequences, self.cfg.micro_batch
        return [stack(seqs[i : i + b]) for i in range(0, len(seqs), b)]

    def run(self, stop_after: int | None = None) -> dict[str, Any]:
        summary = super().run(stop_after)
        summary["data"] = {k: {n: v[n] for n in ("conversations", "dropped_too_long", "trained_tokens", "sequences")}
                           for k, v in self.data_stats.items()}  # fmt: skip
        return summary


def _one_per_kind(examples: Sequence[SFTExample]) -> list[SFTExample]:
    seen, out = set(), []
    for ex in examples:
        if (ex.domain, ex.mode) not in seen:
            seen.add((ex.domain, ex.mode))
            out.append(ex)
    return out


def _segments_text(tokenizer: Any, ex: SFTExample) -> list[dict]:
    """The example as alternating context / trained text runs (for inspection)."""
    runs: list[dict] = []
    for i, ok in zip(ex.ids, ex.trainable):
        if runs and runs[-1]["trained"] == ok:
            runs[-1]["ids"].append(i)
        else:
            runs.append({"trained": ok, "ids": [i]})
    return [{"trained": r["trained"], "text": tokenizer.decode(r["ids"], skip_special_tokens=False)} for r in runs]


def sft(config: SFTConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run an SFT recipe to the end (resuming if asked); returns the summary (as `pretrain`)."""
    from nemotron3.train.pretrain import run_to_end

    return run_to_end(SFTTrainer, config, resume=resume, progress=progress)


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def assistant_token_loss(model: torch.nn.Module, batches: Sequence[PackedBatch]) -> float:
    """Mean CE (nats/token) of the labelled (assistant) tokens of packed SFT batches."""
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        s, n = token_cross_entropy(model(b.input_ids, doc_ids=b.doc_ids).logits, b.labels)
        total, count = total + float(s), count + n
    return total / max(count, 1)


def mode_accuracy(
    llm: Any,
    domain: str,
    n: int,
    *,
    thinking: bool = True,
    seed: int = EVAL_SEED,
    max_tokens: int = 256,
    options: dict | None = None,
) -> dict[str, Any]:
    """Greedy exact-match accuracy with thinking on (`task_accuracy` itself) or off (the same instances,
    prompts rendered with enable_thinking=False, i.e. ending `<think></think>`)."""
    if thinking:
        return {**task_accuracy(llm, domain, n, seed=seed, max_tokens=max_tokens, options=options), "thinking": True}
    from nemotron3 import SamplingParams

    instances = generate(domain, n, seed, **(options or {}))
    prompts = [
        render_chat([m for m in x.as_messages() if m["role"] in ("system", "user")][:2], tools=x.tools or None,
                    add_generation_prompt=True, enable_thinking=False)
        for x in instances
    ]  # fmt: skip
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    correct = [verify(x, o.outputs[0].text) for x, o in zip(instances, outputs)]
    return {
        "domain": domain, "n": n, "correct": sum(correct), "accuracy": sum(correct) / n, "options": options or {},
        "thinking": False,
        "examples": [{"prompt": x.prompt, "gold": x.answer, "output": o.outputs[0].text, "correct": c}
                     for x, o, c in list(zip(instances, outputs, correct))[:3]],
    }  # fmt: skip
