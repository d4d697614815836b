"""Causal attention over a flat token batch: frozen metadata, and the backends that read it.

One :class:`AttentionMetadata` describes a forward pass, as pure data. The queries of sequence ``s`` are always
the *last* ``q_lens[s]`` tokens of its context of ``kv_lens[s]`` tokens; this covers training (whole
sequences), chunked prefill, decode, and SwiftKV's "only the tokens that need logits" (after
:meth:`AttentionMetadata.select_last`).

Keys and values are stored per *KV owner* (see :class:`swiftkv.config.SwiftKVConfig`): a layer that owns its
KV calls ``backend.store(owner, k, v, meta)``; every layer then calls ``backend.attend(owner, q, meta)``. Two
backends share that interface (vLLM's ``AttentionImpl``; nano-vllm's ``Attention``): :class:`FullSequenceAttention`
here (training, evaluation, the transformers wrapper: no cache) and
:class:`~swiftkv.layers.paged_attention.PagedAttention` (the engine's paged KV cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
import torch.nn.functional as F

from swiftkv.kernels import flash_amx


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each query token sits: per-sequence query and context lengths, and (paged mode) the cache slots and
    block tables. ``logits_seq_ids`` lists the sequences whose last token needs logits (None: every token)."""

    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    # Full-sequence mode: where each sequence's keys start in this pass's flat K/V tensors.
    kv_starts: tuple[int, ...] = ()
    # Full-sequence mode only: per-sequence boolean masks [len, len] (True = attend) replacing the causal mask,
    # e.g. one shared context followed by several continuations that each see only the context and themselves
    # (evaluation packs multiple-choice items this way). None = causal.
    masks: tuple[torch.Tensor | None, ...] | None = None
    # Paged mode (engine):
    slot_mapping: torch.Tensor | None = None  # [num_tokens] int64: cache slot of each token
    block_tables: torch.Tensor | None = None  # [num_seqs, max_blocks] int64
    logits_seq_ids: tuple[int, ...] | None = None
    # derived in __post_init__ (int64 CPU tensors the native kernels read; the flat rows that need logits)
    q_lens_t: torch.Tensor = field(init=False, repr=False)
    kv_lens_t: torch.Tensor = field(init=False, repr=False)
    logits_indices: torch.Tensor | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: set the normalised and derived fields once, here
        put(self, "q_lens", tuple(self.q_lens))
        put(self, "kv_lens", tuple(self.kv_lens))
        if self.logits_seq_ids is not None:
            put(self, "logits_seq_ids", tuple(self.logits_seq_ids))
        if self.masks is not None:
            if len(self.masks) != len(self.q_lens):
                raise ValueError(f"{len(self.masks)} attention masks for {len(self.q_lens)} sequences")
            put(self, "masks", tuple(self.masks))
        starts = self.kv_starts
        if not starts and self.q_lens == self.kv_lens:  # keys are this pass's tokens
            starts = [0]
            for n in self.q_lens[:-1]:
                starts.append(starts[-1] + n)
        put(self, "kv_starts", tuple(starts))
        put(self, "q_lens_t", torch.tensor(self.q_lens, dtype=torch.long))
        put(self, "kv_lens_t", torch.tensor(self.kv_lens, dtype=torch.long))
        idx = None
        if self.needs_selection:  # the last token of each listed sequence
            idx = (self.q_lens_t.cumsum(0) - 1)[list(self.logits_seq_ids)]
        put(self, "logits_indices", idx)

    @classmethod
    def full(cls, seq_lens: list[int], masks: list[torch.Tensor | None] | None = None,
             logits_seq_ids: list[int] | None = None) -> AttentionMetadata:
        """Whole sequences, no cache (training, evaluation, the transformers wrapper)."""
        return cls(q_lens=tuple(seq_lens), kv_lens=tuple(seq_lens), masks=masks, logits_seq_ids=logits_seq_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.q_lens)

    @property
    def paged(self) -> bool:
        return self.block_tables is not None

    @property
    def is_decode(self) -> bool:
        """One query per sequence (decode, or SwiftKV's later layers after :meth:`select_last`)."""
        return all(n == 1 for n in self.q_lens)

    @property
    def needs_selection(self) -> bool:
        """Whether only some tokens need logits (then SwiftKV's later layers run on those alone)."""
        ids = self.logits_seq_ids
        return ids is not None and not (self.is_decode and ids == tuple(range(self.num_seqs)))

    def select_last(self) -> AttentionMetadata:
        """Metadata for one query per sequence of ``logits_seq_ids``: its last token (SwiftKV's later layers)."""
        ids = list(self.logits_seq_ids or ())
        return replace(
            self,
            q_lens=(1,) * len(ids),
            kv_lens=tuple(self.kv_lens[s] for s in ids),
            kv_starts=() if self.paged else tuple(self.kv_starts[s] for s in ids),
            masks=None if self.masks is None else tuple(self.masks[s] for s in ids),
            block_tables=self.block_tables[ids] if self.paged else None,
            slot_mapping=None,
            logits_seq_ids=None,
        )


class AttentionBackend(Protocol):
    """What a layer calls: keep ``owner``'s K/V of this pass, and attend with ``owner``'s keys."""

    def store(self, owner: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None: ...

    def attend(self, owner: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor: ...


class FullSequenceAttention:
    """Whole sequences without a cache: each owner's K/V of this pass, kept for the layers that read them
    (one instance per forward; after :meth:`AttentionMetadata.select_last` the kept keys stay valid)."""

    def __init__(self) -> None:
        self.fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # {owner: (k, v)} [num_tokens, kv_heads, D]

    def store(self, owner: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        self.fresh[owner] = (k, v)

    def attend(self, owner: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [num_queries, heads, D] -> [num_queries, heads, D]."""
        k, v = self.fresh[owner]
        return attend_fresh(q, k, v, meta)


def attend_fresh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                 amx: bool = False) -> torch.Tensor:
    """Queries over keys of this pass (``meta.kv_starts`` into ``k``/``v``): one batched SDPA for equal lengths;
    with ``amx`` (where :func:`swiftkv.kernels.flash_amx.can_run`) whole causal prompts on the kernels' AMX flash
    attention, one call each."""
    if amx and meta.masks is None and meta.q_lens == meta.kv_lens:
        outs, q0 = [], 0
        for n, k0 in zip(meta.q_lens, meta.kv_starts):
            outs.append(flash_amx.causal_attention(q[q0 : q0 + n], k[k0 : k0 + n], v[k0 : k0 + n]))
            q0 += n
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    n = meta.q_lens[0]
    same_len = meta.q_lens == meta.kv_lens and all(x == n for x in meta.q_lens) and len(k) == len(q)
    if same_len and meta.masks is None:
        b, h, d = meta.num_seqs, q.shape[1], q.shape[2]
        qb = q.view(b, n, h, d).transpose(1, 2)  # [B, H, T, D]
        kb = k.view(b, n, k.shape[1], d).transpose(1, 2)  # [B, Hkv, T, D]
        vb = v.view(b, n, v.shape[1], d).transpose(1, 2)
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(b * n, h, d)
    outs, q0 = [], 0
    masks = meta.masks or (None,) * meta.num_seqs
    for ql, kl, k0, mask in zip(meta.q_lens, meta.kv_lens, meta.kv_starts, masks):
        qs, ks, vs = q[q0 : q0 + ql], k[k0 : k0 + kl], v[k0 : k0 + kl]
        if mask is not None and ql != kl:  # a selected last query: its row of the mask
            mask = mask[kl - ql :]
        outs.append(sdpa(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1), mask).transpose(0, 1))
        q0 += ql
    return torch.cat(outs)


def sdpa(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One sequence, head-first: q [H, ql, D] are the last ql of kl keys [Hkv, kl, D]; causal,
    or ``mask`` [ql, kl] (True = attend) when given.

    Inputs get a batch dim: with 3-D inputs PyTorch's CPU SDPA falls back to the slow math path.
    """
    ql, kl = qt.shape[1], kt.shape[1]
    qt, kt, vt = qt[None], kt[None], vt[None]  # [1, H, ql, D]
    if mask is not None:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)
    elif ql == kl:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    elif ql == 1:
        out = F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
    elif qt.device.type == "cpu" and _FLASH_CPU is not None:  # bottom-right causal, masked half skipped
        out = _prior_then_causal(qt, kt, vt)
    else:  # bottom-right aligned causal mask
        mask = torch.ones(ql, kl, dtype=torch.bool, device=qt.device).tril(kl - ql)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)
    return out[0]  # [H, ql, D]


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)  # returns the LSE too


def _prior_then_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [1, H, ql, D], the last ql of kl keys [1, Hkv, kl, D]: attention over the kl - ql earlier keys
    (no mask) and over the ql own keys (causal), merged exactly by their log-sum-exps. Equals the
    bottom-right causal mask without computing its masked part (a chunked prompt's continuation)."""
    p = k.shape[2] - q.shape[2]
    o_prior, lse_prior = _FLASH_CPU(q, k[:, :, :p], v[:, :, :p], 0.0, False)
    o_own, lse_own = _FLASH_CPU(q, k[:, :, p:], v[:, :, p:], 0.0, True)
    w = torch.sigmoid(lse_prior - lse_own)[..., None]  # e^lse_prior / (e^lse_prior + e^lse_own): [1, H, ql, 1]
    return (o_own + (o_prior - o_own) * w).to(q.dtype)  # (the LSEs are fp32: bf16 queries stay bf16)
