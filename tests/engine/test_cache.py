"""SeqCache's block table mirror: the tensor always equals the list, through any sequence of changes."""

from __future__ import annotations

import random

import torch

from nemotron3.engine.cache import SeqCache


def test_table_mirror_follows_appends_truncations_and_clears():
    rng = random.Random(0)
    seq = SeqCache(slot=0)
    next_id = 0
    for step in range(400):
        op = rng.random()
        if op < 0.6:
            n = rng.randint(1, 40)
            seq.add_blocks(list(range(next_id, next_id + n)))
            next_id += n
        elif op < 0.9:
            keep = rng.randint(0, len(seq.blocks))
            expect = seq.blocks[keep:]
            assert seq.truncate(keep) == expect
        else:
            dropped = list(seq.blocks)
            assert seq.clear() == dropped and seq.blocks == []
        if rng.random() < 0.5:  # read sometimes, so stale prefixes would show
            assert seq.table().tolist() == seq.blocks, f"step {step}"
            n = rng.randint(0, len(seq.blocks))
            assert seq.table(n).tolist() == seq.blocks[:n]
    assert seq.table().dtype == torch.int64 and seq.table().is_contiguous()


def test_table_after_truncate_and_regrow_shows_the_new_ids():
    seq = SeqCache(slot=0, blocks=[5, 6, 7])
    assert seq.table().tolist() == [5, 6, 7]
    seq.truncate(1)
    seq.add_blocks([9, 10, 11])
    assert seq.table().tolist() == [5, 9, 10, 11]
