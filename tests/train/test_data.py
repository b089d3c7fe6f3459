"""Packing, document masks, and the streaming dataset's determinism, resume, sharding and workers."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from nemotron3.train.data import (
    IGNORE_INDEX,
    PackedBatch,
    StreamingTextDataset,
    document_attention_mask,
    document_starts,
    pack,
)

EOS, PAD = 2, 0


class ByteTokenizer:
    """Token = byte + 16 (ids 0..15 stay free for specials), so streams are easy to reason about."""

    def encode(self, text: str) -> list[int]:
        return [b + 16 for b in text.encode("utf-8")]


def _stream(docs) -> list[tuple[int, int, int]]:
    """(token, global document index, position in document) for the packed stream, empty docs skipped."""
    out = []
    for g, doc in enumerate(d for d in docs if d):
        out += [(t, g, p) for p, t in enumerate([*doc, EOS])]
    return out


@settings(max_examples=150, deadline=None)
@given(
    docs=st.lists(st.lists(st.integers(16, 99), max_size=12), max_size=8),
    seq_len=st.integers(1, 9),
)
def test_pack_properties(docs, seq_len):
    stream = _stream(docs)
    packed = list(pack(docs, seq_len, EOS, pad_id=PAD))
    assert len(packed) == -(-len(stream) // seq_len)
    seen = []
    for b in packed:
        assert all(x.shape == (seq_len,) and x.dtype == torch.long for x in b)
        real = b.doc_ids >= 0
        assert bool((b.input_ids[~real] == PAD).all() and (b.labels[~real] == IGNORE_INDEX).all())
        assert bool((b.position_in_doc[~real] == -1).all()) and bool(real[: int(real.sum())].all())
        seen += b.input_ids[real].tolist()
    # every token exactly once, in order
    assert seen == [t for t, _, _ in stream]
    # labels: the next token of the same document, else ignored; positions and local doc ids follow the stream
    for i, b in enumerate(packed):
        for t in range(int((b.doc_ids >= 0).sum())):
            k = i * seq_len + t
            _, doc, pos = stream[k]
            same_doc_next = k + 1 < len(stream) and stream[k + 1][1] == doc
            assert b.labels[t] == (stream[k + 1][0] if same_doc_next else IGNORE_INDEX)
            assert b.position_in_doc[t] == pos
            first_doc = stream[i * seq_len][1]
            assert b.doc_ids[t] == doc - first_doc


def test_no_label_crosses_a_document_boundary():
    docs = [[20, 21, 22], [30, 31], [40, 41, 42, 43]]
    (b,) = pack(docs, 12, EOS, pad_id=PAD)
    assert b.input_ids.tolist() == [20, 21, 22, EOS, 30, 31, EOS, 40, 41, 42, 43, EOS]
    assert b.labels.tolist() == [21, 22, EOS, -100, 31, EOS, -100, 41, 42, 43, EOS, -100]
    assert b.doc_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    assert b.position_in_doc.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]
    first, second = pack([[20, 21, 22, 23, 24]], 4, EOS, pad_id=PAD)
    assert first.labels.tolist() == [21, 22, 23, 24]  # the last label looks into the next sequence
    assert second.input_ids.tolist() == [24, EOS, PAD, PAD] and second.labels.tolist() == [EOS, -100, -100, -100]
    assert second.position_in_doc.tolist() == [4, 5, -1, -1] and second.doc_ids.tolist() == [0, 0, -1, -1]


def test_attention_mask_keeps_documents_apart():
    doc_ids = torch.tensor([0, 0, 0, 1, 1, 2, -1, -1])
    mask = document_attention_mask(doc_ids)
    expected = torch.tensor([[doc_ids[i] == doc_ids[j] and j <= i for j in range(8)] for i in range(8)])
    assert torch.equal(mask, expected)
    assert document_attention_mask(doc_ids.expand(3, 8)).shape == (3, 8, 8)
    # masked attention over the packed sequence == attention over each document alone
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 4, generator=g) for _ in range(3))
    packed = _attention(q, k, v, mask)
    for d in (0, 1, 2):
        idx = (doc_ids == d).nonzero().flatten()
        alone = _attention(q[idx], k[idx], v[idx], torch.ones(len(idx), len(idx), dtype=torch.bool).tril())
        torch.testing.assert_close(packed[idx], alone, rtol=0, atol=1e-6)


def _attention(q, k, v, mask):
    scores = (q @ k.T).masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def test_state_resets_at_document_starts():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, -1, -1]])
    starts = document_starts(doc_ids)
    assert starts.tolist() == [[True, False, True, False, False, True], [True, False, False, False, True, False]]
    # a decaying recurrence h_t = a*h_{t-1}*(not start) + x_t matches per-document runs (a Mamba-state stand-in)
    x = torch.arange(1.0, 7.0)
    h, out = torch.tensor(0.0), []
    for t in range(6):
        h = 0.5 * h * (~starts[0, t]) + x[t]
        out.append(h)
    assert torch.stack(out).tolist() == [1.0, 2.5, 3.0, 5.5, 7.75, 6.0]


def _write_corpus(root, n_docs=40, seed=0):
    """Two files of form-feed-separated random documents (10..120 characters)."""
    rng = random.Random(seed)
    words = [
        "to",
        "be",
        "or",
        "not",
        "that",
        "is",
        "the",
        "question",
        "whether",
        "tis",
        "nobler",
        "in",
        "mind",
        "suffer",
        "slings",
        "arrows",
    ]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 25))) for _ in range(n_docs)]
    files = [root / "a.txt", root / "b.txt"]
    half = n_docs // 2
    files[0].write_text("\n\f\n".join(docs[:half]) + "\n")
    files[1].write_text("\n\f\n".join(docs[half:]) + "\n\f\n")
    return files, docs


@pytest.fixture
def corpus(tmp_path):
    return _write_corpus(tmp_path)


def _take(ds, n=None):
    it = iter(ds)
    return [next(it) for _ in range(n)] if n is not None else list(it)


def _same(a: list[PackedBatch], b: list[PackedBatch]) -> bool:
    return len(a) == len(b) and all(all(torch.equal(x, y) for x, y in zip(p, q)) for p, q in zip(a, b))


def test_dataset_covers_every_token_once_and_in_file_order_without_shuffling(corpus):
    files, docs = corpus
    tok = ByteTokenizer()
    plain = StreamingTextDataset(files, tok, 32, shuffle_buffer=1, shuffle_documents=False, epochs=1, eos_id=EOS)
    got = [t for b in _take(plain) for t in b.input_ids[b.doc_ids >= 0].tolist()]
    assert got == [t for d in docs for t in [*tok.encode(d), EOS]]
    shuffled = StreamingTextDataset(files, tok, 32, seed=3, shuffle_buffer=8, epochs=1, eos_id=EOS)
    items = _take(shuffled)
    tokens = Counter(t for b in items for t in b.input_ids[b.doc_ids >= 0].tolist())
    assert tokens == Counter(t for d in docs for t in [*tok.encode(d), EOS])
    assert len(items) == shuffled.items_per_epoch()


def test_dataset_is_deterministic_per_seed(corpus):
    files, _ = corpus
    make = lambda seed: StreamingTextDataset(files, ByteTokenizer(), 16, seed=seed, shuffle_buffer=4, epochs=2)
    assert _same(_take(make(1)), _take(make(1)))
    assert not _same(_take(make(1)), _take(make(2)))
    both = _take(make(1))
    n = make(1).items_per_epoch()
    assert not _same(both[:n], both[n:])  # each epoch has its own order


@pytest.mark.parametrize("batch_size", [None, 3])
def test_resume_reproduces_the_exact_remaining_stream(corpus, batch_size):
    files, _ = corpus
    make = lambda: StreamingTextDataset(files, ByteTokenizer(), 16, seed=7, shuffle_buffer=5, epochs=3,
                                        batch_size=batch_size)  # fmt: skip
    full = _take(make())
    per_epoch = make().items_per_epoch()
    assert len(full) == 3 * per_epoch
    for k in (0, 1, per_epoch - 1, per_epoch, per_epoch + 5, len(full) - 1):
        ds = make()
        it = iter(ds)
        for _ in range(k):
            next(it)
        state = ds.state_dict()
        assert state["epoch"] * per_epoch + state["index"] == k
        assert ds.state_dict(consumed=k) == state
        resumed = make()
        resumed.load_state_dict(state)
        assert _same(_take(resumed), full[k:]), k


def test_resume_refuses_another_configuration(corpus):
    files, _ = corpus
    state = StreamingTextDataset(files, ByteTokenizer(), 16, seed=1).state_dict()
    other = StreamingTextDataset(files, ByteTokenizer(), 32, seed=1)
    with pytest.raises(ValueError, match=r"\['seq_len'\] differ"):
        other.load_state_dict(state)


def test_two_ranks_partition_the_stream(corpus):
    files, _ = corpus
    make = lambda rank, world: StreamingTextDataset(files, ByteTokenizer(), 16, seed=5, shuffle_buffer=6,
                                                    rank=rank, world_size=world, epochs=1)  # fmt: skip
    full = _take(make(0, 1))
    r0, r1 = _take(make(0, 2)), _take(make(1, 2))
    assert len(r0) == len(r1) == len(full) // 2
    assert _same(r0, full[0::2][: len(r0)]) and _same(r1, full[1::2][: len(r1)])


def test_batches_are_stacked_consecutive_sequences(corpus):
    files, _ = corpus
    seqs = _take(StreamingTextDataset(files, ByteTokenizer(), 16, seed=2, epochs=1))
    batches = _take(StreamingTextDataset(files, ByteTokenizer(), 16, seed=2, epochs=1, batch_size=4))
    assert len(batches) == len(seqs) // 4 and batches[0].input_ids.shape == (4, 16)
    for i, b in enumerate(batches):
        assert torch.equal(b.labels, torch.stack([s.labels for s in seqs[4 * i : 4 * i + 4]]))


def test_dataloader_workers_give_the_same_stream_and_resume(corpus):
    files, _ = corpus
    make = lambda: StreamingTextDataset(files, ByteTokenizer(), 16, seed=4, shuffle_buffer=3, epochs=2,
                                        batch_size=2)  # fmt: skip
    full = _take(make())
    loaded = list(DataLoader(make(), batch_size=None, num_workers=2))
    assert _same(loaded, full)
    k = 7
    ds = make()
    ds.load_state_dict(ds.state_dict(consumed=k))
    assert _same(list(DataLoader(ds, batch_size=None, num_workers=2)), full[k:])


def test_works_with_a_trained_tokenizer(corpus, tmp_path):
    from nemotron3.io.tokenizer import Tokenizer
    from nemotron3.train.tokenizer import DOC_END_ID, train_tokenizer

    files, docs = corpus
    tok = Tokenizer.from_dir(train_tokenizer(files, 300, tmp_path / "tok"))
    ds = StreamingTextDataset(files, tok, 64, shuffle_buffer=1, shuffle_documents=False, epochs=1)
    first = next(iter(ds))
    ends = (first.input_ids == DOC_END_ID).nonzero().flatten().tolist()
    assert ends and tok.decode(first.input_ids[: ends[0]].tolist()) == docs[0]


def test_bad_arguments_are_named(corpus, tmp_path):
    files, _ = corpus
    with pytest.raises(ValueError, match="rank=2"):
        StreamingTextDataset(files, ByteTokenizer(), 16, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        StreamingTextDataset([tmp_path / "nope.txt"], ByteTokenizer(), 16)
    with pytest.raises(ValueError, match="seq_len"):
        list(pack([[1]], 0, EOS))
