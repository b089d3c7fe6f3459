"""Data preparation for a pretraining run: corpus, synthetic-task documents, tokenizer, datasets.

All of it is deterministic for a recipe, and cached in the run directory, so a rerun or a resume reads
the same files: `data/tasks_train.txt` (task conversations in the chat template, corpus file format) and
`tokenizer/` (trained on the corpus plus the task file when the recipe names no tokenizer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nemotron3.io.tokenizer import Tokenizer
from nemotron3.train.config import DataSection
from nemotron3.train.corpus import build_corpus
from nemotron3.train.data import PackedBatch, StreamingTextDataset, stack
from nemotron3.train.tasks import generate, render_conversation
from nemotron3.train.tokenizer import train_tokenizer

VALID_SEED_OFFSET = 1_000_003  # task seeds for validation documents never coincide with training ones


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    tokenizer_dir: Path
    train_files: list[Path]
    valid_files: list[Path]


def write_task_file(path: Path, domains: list[str], count: int, seed: int, options: dict[str, dict]) -> Path:
    """`count` task conversations, one document each, form-feed separated, in the chat template.

    Documents cycle through `domains`; a domain listed twice gets twice the share (distinct instances).
    """
    if count <= 0:
        raise ValueError(f"task document count must be > 0, got {count}")
    if not domains:
        raise ValueError("data.task_domains is empty")
    cycle = [domains[i % len(domains)] for i in range(count)]
    pools = {d: iter(generate(d, cycle.count(d), seed, **options.get(d, {}))) for d in set(cycle)}
    text = "\f".join(render_conversation(next(pools[d])) for d in cycle)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return path


def prepare_data(data: DataSection, run_dir: Path) -> PreparedData:
    """Build (or reuse) the corpus, the task files and the tokenizer for `data` under `run_dir`."""
    train_files, valid_files = (
        [Path(f).expanduser() for f in data.train_files],
        [Path(f).expanduser() for f in data.valid_files],
    )
    if data.corpus_dir is not None:
        corpus = build_corpus(Path(data.corpus_dir).expanduser())
        train_files, valid_files = [corpus / "train.txt", *train_files], [corpus / "valid.txt", *valid_files]
    for f in train_files + valid_files:
        if not f.is_file():
            raise FileNotFoundError(f"training file {f} does not exist")
    if data.task_documents > 0:
        train_files.append(write_task_file(run_dir / "data" / "tasks_train.txt", data.task_domains,
                                           data.task_documents, data.seed, data.task_options))  # fmt: skip
    if data.tokenizer is not None:
        tokenizer_dir = Path(data.tokenizer).expanduser()
    else:
        tokenizer_dir = run_dir / "tokenizer"
        stamp = tokenizer_dir / "trained_on.json"
        wanted = {"files": [[f.name, f.stat().st_size] for f in train_files], "vocab_size": data.vocab_size}
        if not stamp.is_file() or json.loads(stamp.read_text()) != wanted:
            train_tokenizer(train_files, data.vocab_size, tokenizer_dir)
            stamp.write_text(json.dumps(wanted) + "\n")
    return PreparedData(Tokenizer.from_dir(tokenizer_dir), tokenizer_dir, train_files, valid_files)


def train_dataset(
    prepared: PreparedData, data: DataSection, rank: int = 0, world_size: int = 1
) -> StreamingTextDataset:
    """The endless, shuffled, resumable stream of [batch/world, seq_len] packed batches for this rank."""
    if data.batch_size % world_size:
        raise ValueError(f"data.batch_size {data.batch_size} must be divisible by the world size {world_size}")
    return StreamingTextDataset(
        prepared.train_files, prepared.tokenizer, data.seq_len, seed=data.seed, shuffle_buffer=data.shuffle_buffer,
        rank=rank, world_size=world_size, batch_size=data.batch_size // world_size,
    )  # fmt: skip


def validation_batches(prepared: PreparedData, data: DataSection, batch_size: int) -> list[PackedBatch]:
    """The first `data.valid_sequences` packed sequences of the held-out corpus, in file order, batched."""
    ds = StreamingTextDataset(prepared.valid_files, prepared.tokenizer, data.seq_len, shuffle_buffer=1,
                              epochs=1, shuffle_documents=False)  # fmt: skip
    sequences = []
    for seq in ds:
        sequences.append(seq)
        if len(sequences) == data.valid_sequences:
            break
    return [stack(sequences[i : i + batch_size]) for i in range(0, len(sequences), batch_size)]


def count_labels(batch: PackedBatch) -> int:
    return int((batch.labels != -100).sum())
