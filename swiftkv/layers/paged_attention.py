"""The engine's attention backend: K/V in a paged cache, attention read from it (CPU native kernels where they
run, else gathered blocks and PyTorch's SDPA).

The path is chosen once per step, from the step's :class:`~swiftkv.layers.attention.AttentionMetadata`, the
cache and the runner's :class:`~swiftkv.kernels.switches.KernelSwitches` (vLLM's metadata builder + ``AttentionImpl``):

- decode (one query per sequence): the native decode kernel in place, else one gather of K and V per layer into
  a buffer reused by every layer of the step, then SDPA (up to 8 rows) or two matmuls around a masked softmax;
- prompts: the native prefill kernel in place where it is this CPU's choice
  (:meth:`~swiftkv.kernels.switches.KernelSwitches.prefill_kernel_preferred`; over a bf16 cache on a CPU with
  AVX512-BF16 its dot-product form); else a fresh prompt attends over this pass's K/V with SDPA, a continuation over
  its gathered blocks.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from swiftkv.kernels import flash_amx
from swiftkv.kernels import paged_attention as kernels
from swiftkv.kernels.linear import bf16_dot_available
from swiftkv.kernels.switches import KernelSwitches
from swiftkv.layers.attention import AttentionMetadata, attend_fresh, sdpa


@dataclass
class _StepPlan:
    """The path for one metadata (one step, or its SwiftKV tail), and that path's buffers."""

    meta: AttentionMetadata
    path: str  # "decode_kernel" | "decode_gather" | "prefill_kernel" | "fresh_or_chunks"
    fresh: dict[int, tuple[torch.Tensor, torch.Tensor]]  # this pass's K/V per owner (prompts without a prior)
    gather: tuple[torch.Tensor, torch.Tensor] | None = None  # decode_gather: K and V buffers, reused by every layer
    mask: torch.Tensor | None = None  # decode_gather: which cached positions each row attends
    runs: list[tuple[int, int, int]] | None = None  # store: (slot, token, length) runs of consecutive slots, if few


_said: set[torch.dtype] = set()  # compute dtypes whose prompt attention was said on stderr


def fresh_prompts_on_amx(switches: KernelSwitches, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether prompts without cached keys run the kernels' AMX flash attention: ``SWIFTKV_PREFILL_ATTENTION`` ``auto``
    (where it would otherwise be SDPA) or ``amx``, where it runs (:func:`~swiftkv.kernels.flash_amx.can_run`: bf16,
    AMX tiles). Default model, 2,048 tokens, 2 cores of a Sapphire Rapids-class Xeon: 5.1 vs 8.3-11 ms a layer for
    PyTorch's SDPA (oneDNN's flash attention); prefill 1.18x."""
    return switches.prefill_attention in ("auto", "amx") and flash_amx.can_run(head_dim, dtype)


class PagedAttention:
    """K/V per owner in ``kv_cache [owners, 2, kv_heads, blocks, block_size, D]`` (head-major, so gathering a
    sequence's blocks yields ``[kv_heads, tokens, D]`` without a copy)."""

    def __init__(self, kv_cache: torch.Tensor, switches: KernelSwitches) -> None:
        self.kv_cache = kv_cache
        native = switches.paged_attention
        self._decode_kernel = native and kernels.can_run(kv_cache)
        self._prefill_kernel = (native and kernels.can_run(kv_cache, prefill=True)
                                and switches.prefill_kernel_preferred(kv_cache.dtype))
        # a bf16 cache on a CPU with AVX512-BF16: the kernels' dot-product forms (prefill D % 32, decode D % 64; else
        # they fall back)
        dots = switches.bf16_dot and kv_cache.dtype == torch.bfloat16 and bf16_dot_available()
        self._prefill_dots = self._prefill_kernel and dots
        self._fresh_amx = (not self._prefill_kernel
                           and fresh_prompts_on_amx(switches, kv_cache.dtype, kv_cache.shape[-1]))
        # said once: what auto (or amx, which falls back to SDPA where the tiles cannot run) chose over the paged kernel
        chosen = (not self._prefill_kernel and switches.prefill_attention in ("auto", "amx")
                  and (native or self._fresh_amx))
        if chosen and kv_cache.dtype not in _said:
            _said.add(kv_cache.dtype)
            print("swiftkv: prefill attention: " + ("the kernels' AMX flash attention for fresh prompts, PyTorch's "
                  "SDPA after cached keys" if self._fresh_amx else "PyTorch's SDPA") +
                  f" for {str(kv_cache.dtype).removeprefix('torch.')} (SWIFTKV_PREFILL_ATTENTION="
                  f"{switches.prefill_attention}; kernel, sdpa or amx override)", file=sys.stderr)
        self._decode_dots = self._decode_kernel and dots
        self._plan: _StepPlan | None = None

    def plan(self, meta: AttentionMetadata) -> _StepPlan:
        """This metadata's path (chosen on its first use; a new metadata object starts a new plan)."""
        if self._plan is None or self._plan.meta is not meta:
            if meta.is_decode:
                path = "decode_kernel" if self._decode_kernel else "decode_gather"
            else:
                path = "prefill_kernel" if self._prefill_kernel else "fresh_or_chunks"
            self._plan = _StepPlan(meta, path, {})
        return self._plan

    def store(self, owner: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """Write this pass's K/V of ``owner`` [num_tokens, kv_heads, D] to the cache slots of ``meta``."""
        plan = self.plan(meta)
        if plan.path == "fresh_or_chunks":
            plan.fresh[owner] = (k, v)
        if plan.runs is None:
            plan.runs = _slot_runs(meta.slot_mapping)
        h, d = k.shape[1], k.shape[2]
        for which, x in ((0, k), (1, v)):
            cache = self.kv_cache[owner, which].view(h, -1, d)  # [Hkv, slots, D]
            if not plan.runs:  # many runs (decode rows of many sequences): one scatter
                cache.index_copy_(1, meta.slot_mapping, x.transpose(0, 1))
            for slot, t, n in plan.runs:  # a prompt's blocks, mostly consecutive: slice copies (~10x the scatter)
                cache[:, slot : slot + n].copy_(x[t : t + n].transpose(0, 1))

    def attend(self, owner: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [num_queries, heads, D] -> [num_queries, heads, D], over ``owner``'s cached keys."""
        plan = self.plan(meta)
        kc, vc = self.kv_cache[owner, 0], self.kv_cache[owner, 1]  # [Hkv, blocks, block_size, D]
        if plan.path == "decode_kernel":
            return kernels.decode_attention(q, kc, vc, meta.block_tables, meta.kv_lens_t, bf16_dot=self._decode_dots)
        if plan.path == "decode_gather":
            return _decode_gathered(q, kc, vc, meta, plan)
        if plan.path == "prefill_kernel":  # prompts, fresh or after cached keys (and any decode rows beside them)
            return kernels.prefill_attention(q, kc, vc, meta.block_tables, meta.q_lens_t, meta.kv_lens_t,
                                             bf16_dot=self._prefill_dots)
        if meta.q_lens == meta.kv_lens and owner in plan.fresh:  # no prior keys: this pass's K/V
            return attend_fresh(q, *plan.fresh[owner], meta, amx=self._fresh_amx)
        return _cached_chunks(q, kc, vc, meta)


_MAX_RUNS = 8


def _slot_runs(slots: torch.Tensor) -> list[tuple[int, int, int]]:
    """``slots`` as ``(first slot, first token, length)`` runs of consecutive slots, or ``[]`` where there are more
    than ``_MAX_RUNS`` of them."""
    if slots.numel() == 0:
        return []
    starts = [0] + (torch.nonzero(slots[1:] - slots[:-1] != 1).flatten() + 1).tolist()
    if len(starts) > _MAX_RUNS:
        return []
    ends = starts[1:] + [slots.numel()]
    first = slots[starts].tolist()
    return [(f, a, b - a) for f, a, b in zip(first, starts, ends)]


def _cached_chunks(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Each sequence's queries over its gathered blocks (a prompt after a cached prefix, a chunk of one)."""
    h, block_size, d = kc.shape[0], kc.shape[2], kc.shape[3]
    outs, q0 = [], 0
    for s, (ql, kl) in enumerate(zip(meta.q_lens, meta.kv_lens)):
        blocks = meta.block_tables[s, : -(-kl // block_size)]
        k = kc.index_select(1, blocks).view(h, -1, d)[:, :kl]  # [Hkv, kl, D]
        v = vc.index_select(1, blocks).view(h, -1, d)[:, :kl]
        outs.append(sdpa(q[q0 : q0 + ql].transpose(0, 1), k, v).transpose(0, 1))
        q0 += ql
    return torch.cat(outs)


def _decode_gathered(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, meta: AttentionMetadata,
                     plan: _StepPlan) -> torch.Tensor:
    """One query per sequence over its cached blocks, gathered: one gather per K and V into the step's buffers,
    then one SDPA call (small batches: fewest ops) or two matmuls around a masked softmax (faster from ~8 rows)."""
    b, heads, d = q.shape
    h, block_size = kc.shape[0], kc.shape[2]
    flat = meta.block_tables.flatten()
    if plan.gather is None:  # allocated once per step: fresh big buffers page-fault
        plan.gather = (kc.new_empty(h, flat.numel(), block_size, d), vc.new_empty(h, flat.numel(), block_size, d))
        pos = torch.arange(meta.block_tables.shape[1] * block_size, device=q.device)
        attend = pos[None, :] < meta.kv_lens_t.to(q.device)[:, None]  # [B, S]; kept in the form this path uses
        plan.mask = attend.view(b, 1, 1, -1) if b <= 8 else ~attend.view(1, b, 1, -1)
    k = torch.index_select(kc, 1, flat, out=plan.gather[0]).view(h, b, -1, d)  # [Hkv, B, S, D]
    v = torch.index_select(vc, 1, flat, out=plan.gather[1]).view(h, b, -1, d)
    if b <= 8:  # mask: True = attend
        out = F.scaled_dot_product_attention(q.view(b, heads, 1, d), k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=plan.mask, enable_gqa=True)
        return out.view(b, heads, d)  # [B, H, 1, D] -> [B, H, D]
    qh = q.view(b, h, heads // h, d).transpose(0, 1)  # [Hkv, B, group, D]
    scores = torch.matmul(qh, k.transpose(-1, -2)).float() * d**-0.5  # [Hkv, B, group, S]
    probs = scores.masked_fill_(plan.mask, float("-inf")).softmax(-1).to(q.dtype)  # mask: True = masked
    return torch.matmul(probs, v).transpose(0, 1).reshape(b, heads, d)
