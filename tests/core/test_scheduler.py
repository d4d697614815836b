"""Scheduler without a model: budgets, chunking, preemption, no leaks (vLLM tests/v1/core style)."""

from __future__ import annotations

import random

import pytest

from swiftkv.engine.block_manager import BlockManager
from swiftkv.engine.scheduler import Scheduler
from swiftkv.engine.sequence import Sequence, SequenceStatus
from swiftkv.sampling_params import SamplingParams


def _seq(i: int, n: int, max_tokens: int = 4) -> Sequence:
    return Sequence(str(i), list(range(n)), SamplingParams(max_tokens=max_tokens))


def _fake_step(sched: Scheduler) -> list[Sequence]:
    """Play the model: advance progress, append a token to sequences that finished their tokens."""
    out = sched.schedule()
    sched.update_after_step(out)
    finished = []
    for seq in out.seqs:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(0)
            if seq.num_tokens - seq.num_prompt_tokens >= seq.params.max_tokens:
                sched.finish(seq, "length")
                finished.append(seq)
    return out, finished


def test_token_budget_and_chunking():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=10)
    sched.add(_seq(0, 25))
    sched.add(_seq(1, 3))
    out = sched.schedule()
    assert out.total_tokens == 10 and out.num_tokens == [10]  # first prompt chunked
    sched.update_after_step(out)
    out = sched.schedule()
    assert out.num_tokens == [10]
    sched.update_after_step(out)
    out = sched.schedule()
    assert out.num_tokens == [5, 3]  # rest of the long prompt + the short one
    assert out.total_tokens <= 10


def test_max_num_seqs_respected():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(5):
        sched.add(_seq(i, 3))
    out = sched.schedule()
    assert len(out.seqs) == 2 and len(sched.running) == 2 and len(sched.waiting) == 3


def test_preemption_recomputes_and_loses_nothing():
    bm = BlockManager(num_blocks=6, block_size=2)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    seqs = [_seq(i, 4, max_tokens=6) for i in range(3)]
    for s in seqs:
        sched.add(s)
    preempted, done = 0, []
    for _ in range(200):
        if not sched.has_unfinished():
            break
        out, finished = _fake_step(sched)
        preempted += len(out.preempted)
        done += finished
        assert bm.num_used_blocks == sum(len(s.block_table) for s in sched.running + list(sched.waiting))
    assert preempted > 0, "the cache was sized to force preemption"
    assert sorted(s.seq_id for s in done) == ["0", "1", "2"]
    assert all(len(s.output_token_ids) == 6 for s in done)
    assert bm.num_free_blocks == 6


def test_prompt_too_large_for_cache_is_rejected():
    sched = Scheduler(BlockManager(2, 4), max_num_seqs=4, max_num_batched_tokens=64)
    with pytest.raises(ValueError, match="needs 3 KV blocks but the cache has only 2"):
        sched.add(_seq(0, 9))


def test_random_requests_with_aborts_do_not_leak():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=16, max_num_batched_tokens=48)
    live: list[Sequence] = []
    every: list[Sequence] = []
    finished = aborted = 0
    next_id = 0
    steps = 0
    while next_id < 1000 or sched.has_unfinished():
        steps += 1
        assert steps < 100_000
        for _ in range(rng.randint(0, 3)):
            if next_id < 1000:
                s = _seq(next_id, rng.randint(1, 60), max_tokens=rng.randint(1, 12))
                sched.add(s)
                live.append(s)
                every.append(s)
                next_id += 1
        if live and rng.random() < 0.1:  # abort a random live request
            victim = live.pop(rng.randrange(len(live)))
            if not victim.is_finished:
                sched.finish(victim, "abort")
                aborted += 1
        out, done = _fake_step(sched)
        assert out.total_tokens <= 48 and len(sched.running) <= 16
        finished += len(done)
        assert bm.num_used_blocks == sum(len(s.block_table) for s in sched.running + list(sched.waiting))
        live = [s for s in live if not s.is_finished]
    assert finished + aborted == 1000
    assert bm.num_free_blocks == bm.num_blocks
    assert not sched.running and not sched.waiting
    assert len(every) == 1000
    assert all(s.status == SequenceStatus.FINISHED and not s.block_table for s in every)
    assert sum(s.finish_reason == "abort" for s in every) == aborted


def test_prefill_batch_tokens_lets_the_oldest_prompt_go_first():
    """With a cap, a step that already holds prompt tokens takes another waiting prompt only within the cap:
    lockstep arrivals get their first tokens one after another instead of all after one long step.
    Shorter prompts still batch; a running prompt chunk counts; no cap = the token budget alone."""
    sched = Scheduler(BlockManager(400, 4), max_num_seqs=8, max_num_batched_tokens=2048, prefill_batch_tokens=256)
    for i in range(3):
        sched.add(_seq(i, 200))
    out, _ = _fake_step(sched)
    assert [s.seq_id for s in out.seqs] == ["0"] and out.num_tokens == [200]
    out, _ = _fake_step(sched)
    assert [s.seq_id for s in out.seqs] == ["0", "1"] and out.num_tokens == [1, 200]  # decode + next prompt
    out, _ = _fake_step(sched)
    assert out.num_tokens == [1, 1, 200]

    short = Scheduler(BlockManager(400, 4), max_num_seqs=16, max_num_batched_tokens=2048, prefill_batch_tokens=256)
    for i in range(6):
        short.add(_seq(i, 50))
    assert short.schedule().num_tokens == [50] * 5  # 250 <= 256; the sixth waits

    chunked = Scheduler(BlockManager(1000, 4), max_num_seqs=8, max_num_batched_tokens=2048, prefill_batch_tokens=256)
    chunked.add(_seq(0, 3000))
    chunked.add(_seq(1, 100))
    out, _ = _fake_step(chunked)
    assert out.num_tokens == [2048]
    out, _ = _fake_step(chunked)
    assert out.num_tokens == [952]  # the rest of the long prompt; 952 + 100 > 256: the short one waits
    out, _ = _fake_step(chunked)
    assert out.num_tokens == [1, 100]

    cached = BlockManager(400, 4, enable_prefix_caching=True)  # a deferred prompt is not looked up again each step
    waiting = Scheduler(cached, max_num_seqs=8, max_num_batched_tokens=2048, prefill_batch_tokens=256)
    for i in range(3):  # distinct prompts: no prefix hits
        waiting.add(Sequence(str(i), [1000 * i + t for t in range(200)], SamplingParams(max_tokens=4)))
    _fake_step(waiting)
    _fake_step(waiting)
    assert cached.num_queried_tokens == 400  # prompts 0 and 1, once each; prompt 2 not yet

    uncapped = Scheduler(BlockManager(400, 4), max_num_seqs=8, max_num_batched_tokens=2048)
    for i in range(3):
        uncapped.add(_seq(i, 200))
    assert uncapped.schedule().num_tokens == [200, 200, 200]
    with pytest.raises(ValueError, match="prefill_batch_tokens"):
        Scheduler(BlockManager(4, 4), max_num_seqs=1, max_num_batched_tokens=8, prefill_batch_tokens=0)
