"""Packed, document-masked, resumable token streams for pretraining.

What:
- `pack(documents_token_ids, seq_len, eos_id)` concatenates documents (each followed by `eos_id`) and cuts
  the stream into fixed-length `PackedBatch`es with no token dropped or repeated: `input_ids`, next-token
  `labels` (-100 where the next token belongs to another document, and on padding), `doc_ids` (segment
  index within the sequence, -1 on padding) and `position_in_doc` (offset of the token from the start of
  its document, continuing across sequence boundaries; -1 on padding).
- `StreamingTextDataset` streams local corpus files (documents separated by form feeds, see
  `nemotron3.train.corpus`), tokenizes, packs and shuffles them, deterministically for a seed, shards the
  sequences across ranks and DataLoader workers, and resumes bit-exactly from `state_dict()`.

Why doc_ids (how nothing leaks across documents): packing puts several documents in one sequence, and a
model run over the raw sequence would let a document see the end of the previous one. The training loop
removes that path in both mixer kinds:
- attention: a query may attend to a key only if both are in the same segment and the key is not in the
  future, `mask[i, j] = doc_ids[i] == doc_ids[j] and j <= i` (`document_attention_mask`);
- Mamba-2: the conv window and the SSM state are zeroed at every segment start
  (`document_starts`, i.e. where `doc_ids` changes), which is what mamba_ssm's `seq_idx` argument does
  inside the chunked scan; the state entering a document is then the same as at the start of a sequence.
Labels are -100 across a boundary, so no position is trained to predict another document's first token.
A document cut by a sequence boundary continues in the next sequence as a fresh segment (its
`position_in_doc` does not restart at 0), like every packed-pretraining pipeline without cross-sequence
state.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import IterableDataset, get_worker_info

from nemotron3.train.corpus import index_documents, read_document
from nemotron3.train.tokenizer import DOC_END_ID, PAD_ID

IGNORE_INDEX = -100
"""Label value ignored by torch.nn.functional.cross_entropy (its default ignore_index)."""
STATE_VERSION = 1


class PackedBatch(NamedTuple):
    """One packed sequence ([T] tensors) or a batch of them ([B, T]); all int64.

    A NamedTuple so that torch's default_collate stacks it field by field.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor
    position_in_doc: torch.Tensor


def pack(
    documents_token_ids: Iterable[Sequence[int]], seq_len: int, eos_id: int, *, pad_id: int | None = None
) -> Iterator[PackedBatch]:
    """Pack documents (each followed by `eos_id`) into `seq_len`-token sequences; the last one is padded.

    Empty documents are skipped (they would add a lone `eos_id`). Padding uses `pad_id` (default `eos_id`)
    with label -100 and doc_id/position -1. The label of a sequence's last token is the first token of the
    next sequence when both belong to the same document.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    pad = eos_id if pad_id is None else pad_id
    tokens: list[int] = []
    docs: list[int] = []
    positions: list[int] = []
    doc_counter = 0
    for document in documents_token_ids:
        ids = list(document)
        if not ids:
            continue
        ids.append(eos_id)
        tokens.extend(ids)
        docs.extend([doc_counter] * len(ids))
        positions.extend(range(len(ids)))
        doc_counter += 1
        while len(tokens) > seq_len:  # strictly more: the next token labels the last position
            yield _make_sequence(tokens, docs, positions, seq_len, pad)
            del tokens[:seq_len], docs[:seq_len], positions[:seq_len]
    while tokens:
        yield _make_sequence(tokens, docs, positions, seq_len, pad)
        del tokens[:seq_len], docs[:seq_len], positions[:seq_len]


def _make_sequence(tokens: list[int], docs: list[int], positions: list[int], seq_len: int, pad: int) -> PackedBatch:
    """Build one PackedBatch from the head of the buffers (one token of look-ahead for the last label)."""
    n = min(seq_len, len(tokens))
    labels = [tokens[t + 1] if t + 1 < len(tokens) and docs[t + 1] == docs[t] else IGNORE_INDEX for t in range(n)]
    local: dict[int, int] = {}
    doc_ids = [local.setdefault(d, len(local)) for d in docs[:n]]
    fill = seq_len - n
    return PackedBatch(
        input_ids=torch.tensor(tokens[:n] + [pad] * fill, dtype=torch.long),
        labels=torch.tensor(labels + [IGNORE_INDEX] * fill, dtype=torch.long),
        doc_ids=torch.tensor(doc_ids + [-1] * fill, dtype=torch.long),
        position_in_doc=torch.tensor(positions[:n] + [-1] * fill, dtype=torch.long),
    )


def document_attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask [..., T, T], True where query i may attend key j: same segment and j <= i.

    Padding (-1) attends only to earlier padding, so no row is empty (softmax stays finite).
    """
    same = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)
    t = doc_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    return same & causal


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [..., T], True at the first token of every segment: where Mamba conv/SSM state is reset."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    return starts


def stack(batches: Sequence[PackedBatch]) -> PackedBatch:
    """Stack [T] PackedBatches into one [B, T] PackedBatch."""
    return PackedBatch(*(torch.stack(fields) for fields in zip(*batches)))


class StreamingTextDataset(IterableDataset):
    """Tokenized, packed, shuffled sequences from local corpus files; deterministic, sharded and resumable.

    Per epoch e: the documents of all `files` are put in a seeded order (`shuffle_documents`), tokenized
    lazily, packed into `seq_len` sequences, passed through a seeded shuffle buffer of `shuffle_buffer`
    sequences, then dealt round-robin to the `world_size` ranks (an epoch's last incomplete round is
    dropped so every rank gets the same count) and, with `batch_size`, stacked into [B, T] batches (the
    last incomplete batch dropped). The stream is endless unless `epochs` is given.

    Items of one rank's stream are numbered per epoch; `state_dict()` is `{epoch, index}` of the next item
    and `load_state_dict` restarts exactly there (the current epoch's pipeline is replayed up to `index`,
    so resuming costs at most one epoch of tokenization and packing, no model work).

    DataLoader workers: use `DataLoader(ds, batch_size=None, num_workers=W)` (batch with `batch_size`
    here). Each worker runs the whole pipeline and keeps every W-th item, so the loader's round-robin
    output is the same stream, in the same order, for any W; the workers' copies do not update this
    object's position, so the training loop counts consumed items and calls `state_dict(consumed=n)`.
    Every rank (and worker) tokenizes the whole corpus: fine for small corpora; for large ones give each
    rank its own files and `world_size=1`.

    `tokenizer` needs `encode(text)` returning token ids (a list, or an object with `.ids` such as a
    `tokenizers.Encoding`); `nemotron3.io.tokenizer.Tokenizer` and `tokenizers.Tokenizer` both work.
    `eos_id` (default `</s>`, id 2 in tokenizers from `nemotron3.train.tokenizer`) ends every document.
    """

    def __init__(
        self,
        files: Sequence[str | Path],
        tokenizer: Any,
        seq_len: int,
        seed: int = 0,
        shuffle_buffer: int = 256,
        *,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int | None = None,
        epochs: int | None = None,
        shuffle_documents: bool = True,
        eos_id: int = DOC_END_ID,
        pad_id: int = PAD_ID,
    ) -> None:
        super().__init__()
        _check_args(files, seq_len, shuffle_buffer, rank, world_size, batch_size, epochs)
        self.files = [Path(f) for f in files]
        self.tokenizer = tokenizer
        self.seq_len, self.seed, self.shuffle_buffer = seq_len, seed, shuffle_buffer
        self.rank, self.world_size, self.batch_size, self.epochs = rank, world_size, batch_size, epochs
        self.shuffle_documents, self.eos_id, self.pad_id = shuffle_documents, eos_id, pad_id
        self._spans: list[tuple[int, tuple[int, int]]] | None = None
        self._items_per_epoch: int | None = None
        self._epoch, self._index = 0, 0

    # ---- position -------------------------------------------------------------------------------------
    def state_dict(self, consumed: int | None = None) -> dict:
        """The position of the next item: tracked by iteration in this process, or `consumed` items from the start.

        Pass `consumed` (the number of items the training loop has taken since the start of training) when
        items come from DataLoader workers, whose progress this object cannot see.
        """
        epoch, index = (self._epoch, self._index) if consumed is None else divmod(consumed, self.items_per_epoch())
        return {"version": STATE_VERSION, "epoch": epoch, "index": index, "config": self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state` (from `state_dict`); refuses a state made with another data configuration."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r}, expected {STATE_VERSION}")
        ours, theirs = self._fingerprint(), state.get("config", {})
        changed = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        if changed:
            raise ValueError(f"data state was saved with a different configuration: {changed} differ")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or index < 0:
            raise ValueError(f"data state has a negative position: epoch={epoch}, index={index}")
        self._epoch, self._index = epoch, index

    def items_per_epoch(self) -> int:
        """Items (sequences, or batches with `batch_size`) per epoch on this rank; tokenizes the corpus once."""
        if self._items_per_epoch is None:
            total = sum(len(ids) + 1 for ids in map(self._encode, self._documents()) if ids)
            sequences = -(-total // self.seq_len) // self.world_size
            self._items_per_epoch = sequences // (self.batch_size or 1)
        return self._items_per_epoch

    # ---- iteration --------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[PackedBatch]:
        worker = get_worker_info()
        n_workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        produced = 0
        epoch, start = self._epoch, self._index
        while self.epochs is None or epoch < self.epochs:
            items = _peek_last(self._epoch_items(epoch, start))
            for index, item, is_last in items:
                mine = produced % n_workers == worker_id
                produced += 1
                if not mine:
                    continue
                self._epoch, self._index = (epoch + 1, 0) if is_last else (epoch, index + 1)
                yield item
            epoch, start = epoch + 1, 0
            self._epoch, self._index = epoch, 0

    def _epoch_items(self, epoch: int, start: int) -> Iterator[tuple[int, Any]]:
        """(index, item) for this rank's items of `epoch` from `start` on (earlier ones are replayed, not stacked)."""
        order = self._documents_in_order(epoch)
        sequences = pack(map(self._encode, order), self.seq_len, self.eos_id, pad_id=self.pad_id)
        shuffled = _shuffle(sequences, self.shuffle_buffer, random.Random(f"{self.seed}/{epoch}/sequences"))
        ranked = _deal(shuffled, self.rank, self.world_size)
        grouped = _group(ranked, self.batch_size) if self.batch_size else ((s,) for s in ranked)
        for index, group in enumerate(grouped):
            if index >= start:
                yield index, stack(group) if self.batch_size else group[0]

    def _documents_in_order(self, epoch: int) -> Iterator[str]:
        """The texts of all documents, in the seeded order of `epoch` (file order when not shuffling)."""
        spans = list(self._document_spans())
        if self.shuffle_documents:
            random.Random(f"{self.seed}/{epoch}/documents").shuffle(spans)
        return (read_document(self.files[i], span) for i, span in spans)

    def _documents(self) -> Iterator[str]:
        """All document texts in file order."""
        return (read_document(self.files[i], span) for i, span in self._document_spans())

    def _document_spans(self) -> list[tuple[int, tuple[int, int]]]:
        """(file index, byte span) of every document, indexed once."""
        if self._spans is None:
            self._spans = [(i, span) for i, path in enumerate(self.files) for span in index_documents(path)]
            if not self._spans:
                raise ValueError(f"no documents in {[str(f) for f in self.files]}")
        return self._spans

    def _encode(self, text: str) -> list[int]:
        """Token ids of one document via the tokenizer's `encode` (list or Encoding-like `.ids`)."""
        encoded = self.tokenizer.encode(text)
        return list(getattr(encoded, "ids", encoded))

    def _fingerprint(self) -> dict:
        """What must match for a saved position to mean the same data: files, sizes and every stream knob."""
        return {
            "files": [[f.name, f.stat().st_size] for f in self.files],
            "seq_len": self.seq_len, "seed": self.seed, "shuffle_buffer": self.shuffle_buffer,
            "shuffle_documents": self.shuffle_documents, "rank": self.rank, "world_size": self.world_size,
            "batch_size": self.batch_size, "eos_id": self.eos_id, "pad_id": self.pad_id,
            "tokenizer_vocab_size": _vocab_size(self.tokenizer),
        }  # fmt: skip


def _vocab_size(tokenizer: Any) -> int | None:
    """The tokenizer's vocabulary size when it exposes one (`vocab_size` or `get_vocab_size()`), else None."""
    size = getattr(tokenizer, "vocab_size", None)
    if size is None and callable(getattr(tokenizer, "get_vocab_size", None)):
        size = tokenizer.get_vocab_size()
    return size if isinstance(size, int) else None


def _check_args(files, seq_len, shuffle_buffer, rank, world_size, batch_size, epochs) -> None:
    """Reject impossible settings with the offending value named."""
    if not files:
        raise ValueError("StreamingTextDataset needs at least one file")
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"data files not found: {missing}")
    if seq_len < 1 or shuffle_buffer < 1:
        raise ValueError(f"seq_len and shuffle_buffer must be >= 1, got {seq_len} and {shuffle_buffer}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1 or None, got {epochs}")


def _shuffle(items: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle-buffer: fill `buffer_size` items, then emit a random one per arrival; drain shuffled at the end."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = rng.randrange(buffer_size)
        buffer[j], item = item, buffer[j]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def _deal(items: Iterable[Any], rank: int, world_size: int) -> Iterator[Any]:
    """Item `rank` of every complete round of `world_size` items (the last partial round is dropped)."""
    round_: list[Any] = []
    for item in items:
        round_.append(item)
        if len(round_) == world_size:
            yield round_[rank]
            round_ = []


def _group(items: Iterable[Any], size: int) -> Iterator[tuple[Any, ...]]:
    """Consecutive complete groups of `size` items (a last partial group is dropped)."""
    group: list[Any] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield tuple(group)
            group = []


def _peek_last(items: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any, bool]]:
    """(index, item, is_last): one item of look-ahead, so the position can roll over to the next epoch."""
    previous = next(items, None)
    for current in items:
        yield (*previous, False)
        previous = current
    if previous is not None:
        yield (*previous, True)
