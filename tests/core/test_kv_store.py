"""Model-free: how a step's K/V reach the paged cache (swiftkv/layers/paged_attention.py). A prompt's slots, whole
blocks mostly consecutive, are copied as slices; many runs (decode rows of many sequences) take one scatter; the
cache ends up the same either way."""

from __future__ import annotations

import torch

from swiftkv.kernels.switches import KernelSwitches
from swiftkv.layers.attention import AttentionMetadata
from swiftkv.layers.paged_attention import _MAX_RUNS, PagedAttention, _slot_runs


def test_slot_runs_are_the_consecutive_stretches_or_none_when_many():
    assert _slot_runs(torch.arange(40, 72)) == [(40, 0, 32)]
    assert _slot_runs(torch.tensor([8, 9, 10, 11, 32, 33, 34, 35, 36, 4])) == [(8, 0, 4), (32, 4, 5), (4, 9, 1)]
    assert _slot_runs(torch.tensor([], dtype=torch.long)) == []
    assert _slot_runs(torch.arange(0, 4 * (_MAX_RUNS + 1), 4)) == []  # every slot its own run: too many


def test_store_writes_the_same_cache_by_slices_or_by_scatter():
    torch.manual_seed(0)
    kv_heads, block_size, d = 3, 4, 8
    for slots in (torch.cat([torch.arange(8, 16), torch.arange(28, 33)]),  # two runs: slices
                  torch.arange(0, 4 * (_MAX_RUNS + 2), 4)):  # one slot per run: the scatter
        n = slots.numel()
        k, v = torch.randn(n, kv_heads, d), torch.randn(n, kv_heads, d)
        attn = PagedAttention(torch.zeros(2, 2, kv_heads, 16, block_size, d), KernelSwitches(paged_attention=False))
        meta = AttentionMetadata(q_lens=(n,), kv_lens=(n,), slot_mapping=slots)
        attn.store(1, k, v, meta)
        expected = torch.zeros(2, 2, kv_heads, 16 * block_size, d)
        expected[1, 0][:, slots], expected[1, 1][:, slots] = k.transpose(0, 1), v.transpose(0, 1)
        assert torch.equal(attn.kv_cache.view(2, 2, kv_heads, -1, d), expected)
