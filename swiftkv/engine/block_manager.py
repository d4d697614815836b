"""Paged KV-cache blocks: allocate, grow, free, and (optionally) reuse cached prompt prefixes.

No model, no tensors: just block ids. Prefix caching follows vLLM v1: every *full* block gets a
hash chained from its predecessor's (:func:`block_hash`: sha256 of the parent's hash and the block's tokens), so
a hash names the whole prefix up to that block. Blocks are reference counted; a block whose count drops to zero
goes to the free queue but keeps its hash, so a later request with the same prefix can take it
back (a hit) until the block is evicted, least recently freed first. One block holds the K/V of
every KV owner (every layer below ``l`` and every AcrossKV group), so a hit skips the whole
network for those tokens, SwiftKV's later layers included.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as Tokens

from swiftkv.engine.sequence import Sequence


def block_hash(parent: bytes | None, tokens: Tokens[int], salt: str | None = None) -> bytes:
    """The prefix hash of a full block: sha256 of its parent block's hash (for a sequence's first block: its cache
    salt, None and "" distinct) and its token ids. Python's ``hash()`` of a tuple, used before, is not collision
    resistant: two prompts could be crafted to share a block hash and so one request's cached K/V (vLLM's
    CVE-2025-25183); a sha256 collision cannot be crafted."""
    h = hashlib.sha256(parent if parent is not None else b"\x00" if salt is None else b"\x01" + salt.encode())
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockManager:
    """Hands out fixed-size KV blocks; a sequence's ``block_table`` maps positions to blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # free blocks, eviction order first (blocks without a hash are put in front)
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.cached: dict[bytes, int] = {}  # prefix hash -> block
        self.block_hash: dict[int, bytes] = {}  # block -> its prefix hash (while cached)
        self.num_queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0  # of those, found cached

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks ``seq`` needs to hold ``num_tokens`` tokens in total."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow ``seq``'s block table to hold ``num_tokens`` tokens; False (no change) if full."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free_blocks):
            return False
        for _ in range(need):
            block, _ = self.free_blocks.popitem(last=False)
            self._evict(block)
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Free the blocks of ``seq``'s table beyond those ``num_tokens`` tokens need (rejected draft tokens'
        slots: nothing there was hashed, so they go to the front of the free queue)."""
        keep = -(-num_tokens // self.block_size)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                self.free_blocks.move_to_end(block, last=False)

    def check(self, seqs: list[Sequence]) -> None:
        """Raise ``AssertionError`` unless the block accounting is consistent with ``seqs`` (every sequence holding
        blocks): each block's reference count equals the tables holding it, the free queue holds exactly the
        unreferenced blocks, each table holds exactly the blocks the sequence's computed tokens need (no
        rejected draft's block left behind), and every cached prefix names a block whose hash it is. For tests,
        between steps."""
        refs = [0] * self.num_blocks
        for seq in seqs:
            for block in seq.block_table:
                refs[block] += 1
            need = -(-seq.num_computed_tokens // self.block_size)
            assert len(seq.block_table) == need, f"{seq.seq_id}: {len(seq.block_table)} blocks for {need}"
            assert len(seq.block_hashes) <= seq.num_computed_tokens // self.block_size, f"{seq.seq_id}: hashed ahead"
        assert refs == self.ref_counts, "reference counts differ from the block tables"
        assert set(self.free_blocks) == {b for b, r in enumerate(refs) if r == 0}, "free queue != unreferenced blocks"
        for h, block in self.cached.items():
            assert self.block_hash.get(block) == h, f"cached block {block} lost its hash"

    def free(self, seq: Sequence) -> None:
        """Release all of ``seq``'s blocks (finish, abort or preemption). Cached blocks stay
        reusable until evicted; the sequence's tail is evicted before its head."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                if block not in self.block_hash:
                    self.free_blocks.move_to_end(block, last=False)  # nothing to reuse: evict first
        seq.block_table = []
        seq.block_hashes = []

    # -- prefix caching ------------------------------------------------------------------------

    def allocate_cached_prefix(self, seq: Sequence) -> int:
        """For a sequence without blocks: take the cached blocks of its longest cached prefix and
        return how many tokens they hold (0 with caching off). The last prompt token is never
        taken from the cache: it must run to produce the first logits."""
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        bs, hit = self.block_size, []
        limit = (seq.num_tokens - 1) // bs  # full blocks strictly before the last token
        parent = None  # (then the salt: a salted request shares cached prefixes only with the same salt)
        for i in range(limit):
            h = block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs], seq.cache_salt)
            block = self.cached.get(h)
            if block is None:
                break
            hit.append((block, h))
            parent = h
        for block, h in hit:
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
        self.num_queried_tokens += seq.num_tokens
        self.num_hit_tokens += len(hit) * bs
        return len(hit) * bs

    def cache_full_blocks(self, seq: Sequence) -> None:
        """After a step: make ``seq``'s newly completed blocks findable by their prefix hash."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), min(seq.num_computed_tokens // bs, len(seq.block_table))):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs], seq.cache_salt)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached:  # else another block already holds this prefix: keep that one
                self.cached[h] = block
                self.block_hash[block] = h

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (benchmarks start each run cold). Blocks in use are unaffected."""
        self.cached.clear()
        self.block_hash.clear()

    def _evict(self, block: int) -> None:
        h = self.block_hash.pop(block, None)
        if h is not None and self.cached.get(h) == block:
            del self.cached[h]
