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


# -- prefix caching -------------------------------------------------------------------------------

def _tok_seq(i: int, tokens: list[int]) -> Sequence:
    return Sequence(str(i), list(tokens), SamplingParams())


def _compute(bm: BlockManager, seq: Sequence) -> None:
    """Play the scheduler and model: take the cached prefix, allocate the rest, compute it."""
    seq.num_computed_tokens = bm.allocate_cached_prefix(seq)
    assert bm.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


def test_a_repeated_prefix_reuses_its_full_blocks_only():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    a = _tok_seq(0, list(range(10)))  # blocks [0..3] [4..7] full, [8, 9] partial
    _compute(bm, a)
    b = _tok_seq(1, list(range(8)) + [50, 51, 52])  # same first two blocks, then different
    assert bm.allocate_cached_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert bm.ref_counts[a.block_table[0]] == 2 and bm.ref_counts[a.block_table[2]] == 1
    c = _tok_seq(2, [99] + list(range(1, 10)))  # differs in the first block: chained hashes miss
    assert bm.allocate_cached_prefix(c) == 0 and c.block_table == []


def test_the_last_prompt_token_is_never_served_from_the_cache():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    _compute(bm, _tok_seq(0, list(range(8))))
    again = _tok_seq(1, list(range(8)))  # all 8 tokens cached, but token 8 must run for logits
    assert bm.allocate_cached_prefix(again) == 4


def test_freed_cached_blocks_are_reused_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = _tok_seq(0, [1, 2, 3, 4, 5])
    _compute(bm, a)  # 3 blocks: [1,2] [3,4] cached, [5] not
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.cached) == 2
    assert bm.allocate_cached_prefix(_tok_seq(1, [1, 2, 3, 4, 9])) == 4  # still there after free
    bm2 = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = _tok_seq(0, [1, 2, 3, 4, 5])
    _compute(bm2, a)
    bm2.free(a)
    big = _tok_seq(1, [7] * 5)  # needs 3 blocks: the uncached one first, then the LRU tail [3,4]
    _compute(bm2, big)
    assert bm2.allocate_cached_prefix(_tok_seq(2, [1, 2, 3, 4, 9])) == 2  # [1,2] survived, [3,4] evicted


def test_caching_off_never_shares():
    bm = BlockManager(num_blocks=16, block_size=4)
    _compute(bm, _tok_seq(0, list(range(10))))
    assert bm.allocate_cached_prefix(_tok_seq(1, list(range(10)))) == 0 and not bm.cached


def test_no_leak_after_random_requests_with_shared_prefixes_and_aborts():
    import random

    from swiftkv.engine.scheduler import Scheduler

    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=True)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=48)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randint(0, 20))] for _ in range(5)]
    live, finished = {}, 0
    for i in range(1000):
        tail = [rng.randrange(1000) for _ in range(rng.randint(1, 12))]
        seq = Sequence(str(i), rng.choice(prefixes) + tail, SamplingParams(max_tokens=rng.randint(1, 6)))
        sched.add(seq)
        live[seq.seq_id] = seq
        for _ in range(rng.randint(0, 3)):
            out = sched.schedule()
            sched.update_after_step(out)
            for s in out.seqs:
                if s.num_computed_tokens == s.num_tokens:
                    s.token_ids.append(rng.randrange(1000))
                    if s.num_tokens - s.num_prompt_tokens >= s.params.max_tokens:
                        sched.finish(s, "length")
                        live.pop(s.seq_id)
                        finished += 1
            # every running sequence's blocks are counted once per holder
            holders = [b for s in sched.running for b in s.block_table]
            for b in set(holders):
                assert bm.ref_counts[b] == holders.count(b)
        if rng.random() < 0.2 and live:  # abort a random live request
            victim = live.pop(rng.choice(sorted(live)))
            sched.finish(victim, "abort")
    for seq in list(live.values()):
        sched.finish(seq, "abort")
    assert not sched.running and not sched.waiting
    assert bm.num_free_blocks == bm.num_blocks and all(r == 0 for r in bm.ref_counts)
    assert finished > 100 and bm.num_hit_tokens > 0  # the shared prefixes were really reused
    assert all(bm.cached[h] == b for b, h in bm.block_hash.items())  # the two maps agree


def test_block_hashes_are_sha256_of_the_whole_prefix():
    """A block's hash is sha256 of its parent's hash (a first block: its salt) and its tokens: the same prefix gives
    the same bytes in any process, a different parent, salt or token a different hash. Python's hash() of a tuple,
    used before, can be made to collide (hash(-1) == hash(-2) shows how little it promises)."""
    import hashlib
    import subprocess
    import sys
    from array import array

    from swiftkv.engine.block_manager import block_hash

    a = block_hash(None, [1, 2, 3, 4])
    assert a == hashlib.sha256(b"\x00" + array("q", [1, 2, 3, 4]).tobytes()).digest()
    assert block_hash(None, [1, 2, 3, 5]) != a
    assert len({block_hash(None, [1, 2, 3, 4], s) for s in (None, "", "tenant-a", "tenant-b")}) == 4
    assert block_hash(a, [5, 6, 7, 8]) != block_hash(block_hash(None, [9, 9, 9, 9]), [5, 6, 7, 8])  # chained
    code = "from swiftkv.engine.block_manager import block_hash; print(block_hash(None, [1, 2, 3, 4]).hex())"
    for seed in ("0", "1"):  # not salted by the process (Python's str hashes are)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": ""})
        assert out.stdout.strip() == a.hex()
    assert hash(-1) == hash(-2) and (-1,) != (-2,)  # (why not hash())


def test_salted_requests_share_cached_prefixes_only_with_their_salt():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    tokens = list(range(13))
    _compute(bm, Sequence("a", tokens, SamplingParams(), cache_salt="tenant-a"))
    for salt, hit in (("tenant-a", 12), ("tenant-b", 0), (None, 0)):
        seq = Sequence(f"s-{salt}", tokens, SamplingParams(), cache_salt=salt)
        assert bm.allocate_cached_prefix(seq) == hit, salt
        bm.free(seq)
