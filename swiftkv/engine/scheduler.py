"""Continuous batching: a token budget per step, chunked prefill, preemption by recompute, and
prefix caching (a request admitted with a cached prompt prefix computes only the rest).

Every step the running sequences go first (decodes and unfinished prompt chunks, oldest first),
then waiting requests are admitted while the token budget, ``max_num_seqs`` and free KV blocks
allow (and, with ``prefill_batch_tokens``, while the step's prompt tokens stay within it: the
oldest prompt gets its first token sooner instead of sharing a long step with the next ones).
Long prompts are split into chunks. When blocks run out, the most recently admitted
running sequence is preempted: its blocks are freed and it is recomputed later (nothing lost).

Speculative decoding: a decoding sequence's draft tokens (``spec_token_ids``) are scheduled with its pending
token, as far as the budget allows; after the step the rejected ones are rolled back (:meth:`update_after_step`):
the sequence's computed tokens stop at the last accepted one and the blocks only rejected drafts used are freed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from swiftkv.engine.block_manager import BlockManager
from swiftkv.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """What to run this step: ``num_tokens[i]`` new tokens of ``seqs[i]`` (its draft tokens included, last)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 prefill_batch_tokens: int | None = None) -> None:
        """``prefill_batch_tokens``: once a step holds prompt tokens, another waiting prompt joins it only if
        the step's prompt tokens stay within this many (None: only the token budget limits them)."""
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if prefill_batch_tokens is not None and prefill_batch_tokens < 1:
            raise ValueError(f"prefill_batch_tokens must be >= 1 or None, got {prefill_batch_tokens}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_batch_tokens = prefill_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        blocks = -(-seq.num_tokens // self.block_manager.block_size)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt of {seq.num_tokens} tokens needs {blocks} KV blocks but the cache has only "
                f"{self.block_manager.num_blocks}; raise kv_cache_memory or shorten the prompt"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark ``seq`` finished (or aborted) and free its blocks, wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.spec_token_ids = []  # recomputed from the prompt: drafts are proposed again after its next token
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # 1) running sequences, oldest first; preempt the newest when blocks run out
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens + len(seq.spec_token_ids), budget)
            del seq.spec_token_ids[max(0, n - seq.num_uncomputed_tokens):]  # drafts beyond the budget wait
            while not self.block_manager.allocate(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.seqs.append(seq)
                out.num_tokens.append(n)
                budget -= n
                i += 1
                continue
            break  # seq itself was preempted: nothing later in `running` remains
        # 2) admit waiting sequences (not in a step that had to preempt)
        prompt_tokens = sum(n for n in out.num_tokens if n > 1)  # running prompt chunks (decodes are 1)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            cap = self.prefill_batch_tokens
            if cap is not None and prompt_tokens > 0 and prompt_tokens + min(seq.num_uncomputed_tokens, budget) > cap:
                break  # the step's earlier prompts go first (checked before the prefix lookup: no repeated queries)
            if not seq.block_table:  # new or preempted: start from its longest cached prefix, if any
                seq.num_computed_tokens = self.block_manager.allocate_cached_prefix(seq)
            n = seq.num_uncomputed_tokens
            n = min(n, budget)  # a prompt longer than the budget is chunked across steps
            if not self.block_manager.allocate(seq, seq.num_computed_tokens + n):
                self.block_manager.free(seq)  # give the cached prefix back; retried next step
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_tokens.append(n)
            budget -= n
            prompt_tokens += n
        return out

    def update_after_step(self, out: SchedulerOutput, num_rejected: list[int] | None = None) -> None:
        """The model computed the scheduled tokens: advance each sequence's progress. ``num_rejected[i]``: how many
        of ``seqs[i]``'s draft tokens were rejected (their KV is rolled back: not counted as computed, and blocks
        only they used are freed). Called after the step's accepted tokens were appended to ``token_ids``."""
        for i, (seq, n) in enumerate(zip(out.seqs, out.num_tokens)):
            seq.num_computed_tokens = min(seq.num_computed_tokens + n - (num_rejected[i] if num_rejected else 0),
                                          seq.num_tokens)  # (tokens after a stop are not kept)
            seq.spec_token_ids = []
            if not seq.is_finished:
                self.block_manager.trim(seq, seq.num_computed_tokens)
            self.block_manager.cache_full_blocks(seq)
