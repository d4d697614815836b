"""Paged KV-cache blocks: allocate, grow, free. No model, no tensors: just block ids."""

from __future__ import annotations

from collections import deque

from swiftkv.engine.sequence import Sequence


class BlockManager:
    """Hands out fixed-size KV blocks; a sequence's ``block_table`` maps positions to blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks ``seq`` needs to hold ``num_tokens`` tokens in total."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free_blocks)

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow ``seq``'s block table to hold ``num_tokens`` tokens; False (no change) if full."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free_blocks):
            return False
        seq.block_table.extend(self.free_blocks.popleft() for _ in range(need))
        return True

    def free(self, seq: Sequence) -> None:
        """Return all of ``seq``'s blocks (finish, abort or preemption)."""
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
