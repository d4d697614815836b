"""Block manager without a model (vLLM tests/v1/core style)."""

from __future__ import annotations

import pytest

from swiftkv.engine.block_manager import BlockManager
from swiftkv.engine.sequence import Sequence
from swiftkv.sampling_params import SamplingParams


def _seq(i: int, n: int) -> Sequence:
    return Sequence(str(i), list(range(n)), SamplingParams())


def test_allocate_grow_free():
    bm = BlockManager(num_blocks=10, block_size=4)
    s = _seq(0, 9)
    assert bm.allocate(s, 9) and len(s.block_table) == 3 and bm.num_free_blocks == 7
    assert bm.allocate(s, 12) and len(s.block_table) == 3  # still fits
    assert bm.allocate(s, 13) and len(s.block_table) == 4
    assert len(set(s.block_table)) == 4
    bm.free(s)
    assert s.block_table == [] and bm.num_free_blocks == 10


def test_allocation_fails_cleanly_when_full():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = _seq(0, 12), _seq(1, 8)
    assert bm.allocate(a, 12)
    assert not bm.allocate(b, 8)
    assert b.block_table == [] and bm.num_free_blocks == 1  # no partial allocation
    assert bm.allocate(b, 4)


def test_blocks_are_never_shared():
    bm = BlockManager(num_blocks=32, block_size=2)
    seqs = [_seq(i, 7) for i in range(4)]
    for s in seqs:
        assert bm.allocate(s, 7)
    used = [b for s in seqs for b in s.block_table]
    assert len(used) == len(set(used)) == 16


def test_invalid_sizes():
    with pytest.raises(ValueError):
        BlockManager(0, 16)
