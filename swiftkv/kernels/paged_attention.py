"""Attention read in place from the paged KV cache (CPU; an fp32 or bf16 cache, fp32 sums).

Without it, every layer of every decode step gathers each sequence's K/V blocks into a fresh
contiguous buffer and runs a batched attention over it. :func:`decode_attention` instead runs a
small C kernel (``csrc/skv_paged_attention.c``) that follows each sequence's block table: one pass over
the cached rows, the query heads of a KV head together. :func:`prefill_attention` does the same for
prompts (fresh, after a cached prefix, or a chunk of one; ``csrc/skv_paged_prefill.c``, and with AVX512-BF16 dot
products over a bf16 cache ``csrc/skv_paged_prefill_bf16.c``; both on ``csrc/skv_flash.h``): flash-attention
tiles, the group's query heads sharing each block of keys, the blocks right of the diagonal never read.
The engine's :class:`~swiftkv.layers.paged_attention.PagedAttention` calls them (``SWIFTKV_PAGED_ATTENTION=0``
switches both off there: then it gathers and calls PyTorch's SDPA).
"""

from __future__ import annotations

import ctypes

import torch

from swiftkv.kernels import build

_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class CPagedAttn(ctypes.Structure):
    """Mirror of ``skv_paged_attn`` (one call's arguments; checked against the library when it loads)."""

    _fields_ = [("q", _P), ("out", _P), ("k_cache", _P), ("v_cache", _P), ("block_tables", _P), ("q_lens", _P),
                ("kv_lens", _P), ("S", _I64), ("H", _I64), ("Hkv", _I64), ("D", _I64), ("num_blocks", _I64),
                ("block_size", _I64), ("max_blocks", _I64), ("scale", ctypes.c_float), ("kv_bf16", _I64),
                ("bf16_dot", _I64), ("q_bf16", _I64), ("nthreads", ctypes.c_int)]


_BINDING = build.Binding({
    "skv_paged_decode_attention": (ctypes.c_int, [ctypes.POINTER(CPagedAttn)]),
    "skv_paged_prefill_attention": (ctypes.c_int, [ctypes.POINTER(CPagedAttn)]),
    "skv_paged_prefill_attention_bf16": (ctypes.c_int, [ctypes.POINTER(CPagedAttn)]),
}, structs={4: CPagedAttn})


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot run (no AVX2/FMA, no compiler)."""
    return _BINDING.library()


def can_run(kv_cache: torch.Tensor, prefill: bool = False) -> bool:
    """Whether :func:`decode_attention` (or, with ``prefill``, :func:`prefill_attention`) takes this cache (and
    queries of its dtype): CPU, fp32 or bf16, head_dim % 8 == 0; the prefill kernel also needs block_size % 4 == 0.
    ``kv_cache`` is any view whose last two dims are [block_size, D]."""
    return (kv_cache.dtype in (torch.float32, torch.bfloat16) and kv_cache.device.type == "cpu"
            and kv_cache.shape[-1] % 8 == 0 and (not prefill or kv_cache.shape[-2] % 4 == 0)
            and library() is not None)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"paged {what} attention failed ({'out of memory' if rc == -2 else 'bad shapes'})")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     kv_lens: torch.Tensor, bf16_dot: bool = False) -> torch.Tensor:
    """One query per sequence over its cached keys and values.

    q [B, H, D]; k_cache, v_cache [Hkv, num_blocks, block_size, D] (contiguous, one KV owner's);
    block_tables [B, max_blocks] int64; kv_lens [B] int64 -> [B, H, D].

    ``bf16_dot`` (only where :func:`~swiftkv.kernels.linear.bf16_dot_available`): a bf16 cache with D % 64 == 0
    runs on AVX512-BF16 dot products (``csrc/skv_paged_decode_bf16.c``: queries and probabilities rounded to bf16,
    every sum fp32); other caches take the AVX2 form.
    """
    b = q.shape[0]
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the paged K/V cache must be contiguous")
    dtype = q.dtype
    q, tables = q.float().contiguous(), block_tables.contiguous()
    out = torch.empty_like(q)
    rc = library().skv_paged_decode_attention(_args(q, out, k_cache, v_cache, tables, None, kv_lens.contiguous(), b,
                                                    bf16_dot))
    _check(rc, "decode")
    return out.to(dtype)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      q_lens: torch.Tensor, kv_lens: torch.Tensor, bf16_dot: bool = False) -> torch.Tensor:
    """The last ``q_lens[s]`` of each sequence's ``kv_lens[s]`` cached tokens attend over its keys, bottom-right
    causal (a fresh prompt has ``q_len == kv_len``; a decode row ``q_len == 1``).

    q [sum(q_lens), H, D] (sequence after sequence); k_cache, v_cache [Hkv, num_blocks, block_size, D]
    (contiguous, one KV owner's, holding every key, this pass's included); block_tables [S, max_blocks]
    int64; q_lens, kv_lens [S] int64 -> [sum(q_lens), H, D].

    ``bf16_dot`` (only where :func:`~swiftkv.kernels.linear.bf16_dot_available`): a bf16 cache with D % 32 == 0
    runs on AVX512-BF16 dot products (``csrc/skv_paged_prefill_bf16.c``: queries and probabilities rounded to
    bf16, every sum fp32; ~2.2x the fp32 kernel on Zen 4; bf16 queries read and the output written as bf16, no
    conversion); other caches take the fp32 kernel.
    """
    t = q.shape[0]
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the paged K/V cache must be contiguous")
    if int(q_lens.sum()) != t:
        raise ValueError(f"{t} query tokens for q_lens summing to {int(q_lens.sum())}")
    dtype = q.dtype
    tables, q_lens, kv_lens = block_tables.contiguous(), q_lens.contiguous(), kv_lens.contiguous()
    if bf16_dot:
        qd = q.contiguous() if dtype == torch.bfloat16 else q.float().contiguous()
        out = torch.empty_like(qd)
        rc = library().skv_paged_prefill_attention_bf16(_args(qd, out, k_cache, v_cache, tables, q_lens, kv_lens,
                                                              len(q_lens)))
        if rc != -1:
            _check(rc, "prefill")
            return out.to(dtype)
    # not a bf16 cache with D % 32 == 0 (or no such instructions built): the fp32 kernel
    q = q.float().contiguous()
    out = torch.empty_like(q)
    _check(library().skv_paged_prefill_attention(_args(q, out, k_cache, v_cache, tables, q_lens, kv_lens, len(q_lens))),
           "prefill")
    return out.to(dtype)


def _args(q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
          q_lens: torch.Tensor | None, kv_lens: torch.Tensor, num_seqs: int, bf16_dot: bool = False) -> ctypes.pointer:
    """The call's :class:`CPagedAttn` (the tensors must outlive the call)."""
    h, d = q.shape[1], q.shape[2]
    hkv, num_blocks, block_size = k_cache.shape[:3]
    return ctypes.pointer(CPagedAttn(q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                     tables.data_ptr(), None if q_lens is None else q_lens.data_ptr(),
                                     kv_lens.data_ptr(), num_seqs, h, hkv, d, num_blocks, block_size, tables.shape[1],
                                     d**-0.5, int(k_cache.dtype == torch.bfloat16), int(bf16_dot),
                                     int(q.dtype == torch.bfloat16), torch.get_num_threads()))
