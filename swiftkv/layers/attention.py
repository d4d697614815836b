"""Causal attention over a flat token batch, with or without a paged KV cache.

One :class:`AttentionMetadata` describes a forward pass. The queries of sequence ``s`` are always
the *last* ``q_lens[s]`` tokens of its context of ``kv_lens[s]`` tokens; this covers training
(whole sequences), chunked prefill, decode, and SwiftKV's "only the tokens that need logits"
(after :meth:`AttentionMetadata.select_last`).

Keys and values are stored per *KV owner* (see :class:`swiftkv.config.SwiftKVConfig`): a layer
that owns its KV calls :meth:`store`; every layer then calls :meth:`attend` with its owner index.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from swiftkv.kernels import paged_attention


@dataclass
class AttentionMetadata:
    q_lens: list[int]
    kv_lens: list[int]
    # Full-sequence mode: where each sequence's keys start in this pass's flat K/V tensors.
    kv_starts: list[int] = field(default_factory=list)
    # Paged-cache mode (engine). kv_cache: [num_owners, 2, kv_heads, num_blocks, block_size, D]
    # (head-major, so gathering a sequence's blocks yields [kv_heads, tokens, D] without a copy).
    kv_cache: torch.Tensor | None = None
    slot_mapping: torch.Tensor | None = None  # [num_tokens] int64: cache slot of each token
    block_tables: torch.Tensor | None = None  # [num_seqs, max_blocks] int64
    # This pass's freshly computed K/V per owner: {owner: (k, v)}, each [num_tokens, kv_heads, D].
    fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # Full-sequence mode only: per-sequence boolean masks [len, len] (True = attend) replacing the
    # causal mask, e.g. one shared context followed by several continuations that each see only
    # the context and themselves (evaluation packs multiple-choice items this way). None = causal.
    masks: list[torch.Tensor | None] | None = None
    _decode_mask: torch.Tensor | None = None
    _kv_lens: torch.Tensor | None = None  # see kv_lens_tensor()
    _q_lens: torch.Tensor | None = None
    _gather_buf: tuple[torch.Tensor, torch.Tensor] | None = None  # reused by every layer's decode

    def __post_init__(self) -> None:
        if not self.kv_starts and self.q_lens == self.kv_lens:  # keys are this pass's tokens
            self.kv_starts = [0]
            for n in self.q_lens[:-1]:
                self.kv_starts.append(self.kv_starts[-1] + n)

    @classmethod
    def full(cls, seq_lens: list[int], masks: list[torch.Tensor | None] | None = None) -> AttentionMetadata:
        """Whole sequences, no cache (training, evaluation, the transformers wrapper)."""
        if masks is not None and len(masks) != len(seq_lens):
            raise ValueError(f"{len(masks)} attention masks for {len(seq_lens)} sequences")
        return cls(q_lens=list(seq_lens), kv_lens=list(seq_lens), masks=masks)

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens)

    def kv_lens_tensor(self) -> torch.Tensor:
        """``kv_lens`` as an int64 CPU tensor, made once per step (the native decode kernels read it)."""
        if self._kv_lens is None:
            self._kv_lens = torch.tensor(self.kv_lens)
        return self._kv_lens

    def q_lens_tensor(self) -> torch.Tensor:
        """``q_lens`` as an int64 CPU tensor, made once per step (the native prefill kernel reads it)."""
        if self._q_lens is None:
            self._q_lens = torch.tensor(self.q_lens)
        return self._q_lens

    def select_last(self, seq_ids: list[int]) -> AttentionMetadata:
        """Metadata for one query per listed sequence: its last token (SwiftKV later layers)."""
        paged = self.kv_cache is not None
        return replace(
            self,
            q_lens=[1] * len(seq_ids),
            kv_lens=[self.kv_lens[s] for s in seq_ids],
            kv_starts=[] if paged else [self.kv_starts[s] for s in seq_ids],
            block_tables=self.block_tables[seq_ids] if paged else None,
            slot_mapping=None,
            fresh={} if paged else self.fresh,  # paged: later layers read the cache
            _decode_mask=None,
            _kv_lens=None,
            _q_lens=None,
            _gather_buf=None,
        )

    def store(self, owner: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep this pass's K/V of ``owner`` (and write them to the paged cache if any)."""
        self.fresh[owner] = (k, v)
        if self.kv_cache is not None:
            h, d = k.shape[1], k.shape[2]
            self.kv_cache[owner, 0].view(h, -1, d).index_copy_(1, self.slot_mapping, k.transpose(0, 1))
            self.kv_cache[owner, 1].view(h, -1, d).index_copy_(1, self.slot_mapping, v.transpose(0, 1))

    def attend(self, owner: int, q: torch.Tensor) -> torch.Tensor:
        """q [num_queries, heads, D] -> [num_queries, heads, D]."""
        decode = all(n == 1 for n in self.q_lens)
        if (self.kv_cache is not None and not decode and paged_attention.can_run(q, self.kv_cache, prefill=True)
                and paged_attention.prefill_kernel_preferred(q.dtype)):
            # prompts, fresh or after cached keys (and any decode rows beside them), read in place
            kc, vc = self.kv_cache[owner, 0], self.kv_cache[owner, 1]
            return paged_attention.prefill_attention(q, kc, vc, self.block_tables, self.q_lens_tensor(),
                                                     self.kv_lens_tensor())
        no_prior = self.q_lens == self.kv_lens and owner in self.fresh
        if self.kv_cache is None or no_prior:
            k, v = self.fresh[owner]
            return self._attend_fresh(q, k, v)
        if decode:
            return self._attend_decode(owner, q)
        return self._attend_cached_chunks(owner, q)

    # -- implementations ---------------------------------------------------------------------

    def _attend_fresh(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = self.q_lens[0]
        same_len = self.q_lens == self.kv_lens and all(x == n for x in self.q_lens) and len(k) == len(q)
        if same_len and self.masks is None:
            b, h, d = self.num_seqs, q.shape[1], q.shape[2]
            qb = q.view(b, n, h, d).transpose(1, 2)  # [B, H, T, D]
            kb = k.view(b, n, k.shape[1], d).transpose(1, 2)  # [B, Hkv, T, D]
            vb = v.view(b, n, v.shape[1], d).transpose(1, 2)
            out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)
            return out.transpose(1, 2).reshape(b * n, h, d)
        outs, q0 = [], 0
        masks = self.masks or [None] * self.num_seqs
        for ql, kl, k0, mask in zip(self.q_lens, self.kv_lens, self.kv_starts, masks):
            qs, ks, vs = q[q0 : q0 + ql], k[k0 : k0 + kl], v[k0 : k0 + kl]
            outs.append(_sdpa(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1), mask).transpose(0, 1))
            q0 += ql
        return torch.cat(outs)

    def _attend_cached_chunks(self, owner: int, q: torch.Tensor) -> torch.Tensor:
        kc, vc = self.kv_cache[owner, 0], self.kv_cache[owner, 1]  # [Hkv, blocks, block_size, D]
        h, block_size, d = kc.shape[0], kc.shape[2], kc.shape[3]
        outs, q0 = [], 0
        for s, (ql, kl) in enumerate(zip(self.q_lens, self.kv_lens)):
            blocks = self.block_tables[s, : -(-kl // block_size)]
            k = kc.index_select(1, blocks).view(h, -1, d)[:, :kl]  # [Hkv, kl, D]
            v = vc.index_select(1, blocks).view(h, -1, d)[:, :kl]
            outs.append(_sdpa(q[q0 : q0 + ql].transpose(0, 1), k, v).transpose(0, 1))
            q0 += ql
        return torch.cat(outs)

    def _attend_decode(self, owner: int, q: torch.Tensor) -> torch.Tensor:
        """One query per sequence over its cached blocks: in place where the native kernel runs
        (:mod:`swiftkv.kernels.paged_attention`); otherwise one gather per K and V, then one SDPA call
        (small batches: fewest ops) or two matmuls around a masked softmax (faster from ~8 rows)."""
        kc, vc = self.kv_cache[owner, 0], self.kv_cache[owner, 1]  # [Hkv, blocks, block_size, D]
        if paged_attention.can_run(q, kc):  # in place: no gathered copy
            return paged_attention.decode_attention(q, kc, vc, self.block_tables, self.kv_lens_tensor())
        b, heads, d = q.shape
        h, block_size = kc.shape[0], kc.shape[2]
        flat = self.block_tables.flatten()
        if self._gather_buf is None:  # allocated once per step: fresh big buffers page-fault
            self._gather_buf = (kc.new_empty(h, flat.numel(), block_size, d), vc.new_empty(h, flat.numel(), block_size, d))
            kv_lens = torch.tensor(self.kv_lens, device=q.device)
            pos = torch.arange(self.block_tables.shape[1] * block_size, device=q.device)
            attend = pos[None, :] < kv_lens[:, None]  # [B, S]; kept in the form this step's path uses
            self._decode_mask = attend.view(b, 1, 1, -1) if b <= 8 else ~attend.view(1, b, 1, -1)
        k = torch.index_select(kc, 1, flat, out=self._gather_buf[0]).view(h, b, -1, d)  # [Hkv, B, S, D]
        v = torch.index_select(vc, 1, flat, out=self._gather_buf[1]).view(h, b, -1, d)
        if b <= 8:  # mask: True = attend
            out = F.scaled_dot_product_attention(q.view(b, heads, 1, d), k.transpose(0, 1), v.transpose(0, 1),
                                                 attn_mask=self._decode_mask, enable_gqa=True)
            return out.view(b, heads, d)  # [B, H, 1, D] -> [B, H, D]
        qh = q.view(b, h, heads // h, d).transpose(0, 1)  # [Hkv, B, group, D]
        scores = torch.matmul(qh, k.transpose(-1, -2)).float() * d**-0.5  # [Hkv, B, group, S]
        probs = scores.masked_fill_(self._decode_mask, float("-inf")).softmax(-1).to(q.dtype)  # mask: True = masked
        return torch.matmul(probs, v).transpose(0, 1).reshape(b, heads, d)


def _sdpa(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
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
