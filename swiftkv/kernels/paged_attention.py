"""Attention read in place from the paged KV cache (CPU; an fp32 or bf16 cache, fp32 arithmetic).

Without it, every layer of every decode step gathers each sequence's K/V blocks into a fresh
contiguous buffer and runs a batched attention over it. :func:`decode_attention` instead runs a
small C kernel (``csrc/skv_paged_attention.c``) that follows each sequence's block table: one pass over
the cached rows, the query heads of a KV head together. :func:`prefill_attention` does the same for
prompts (fresh, after a cached prefix, or a chunk of one; ``csrc/skv_paged_prefill.c``): flash-attention
tiles, the group's query heads sharing each block of keys, the blocks right of the diagonal never read.
The engine's :class:`~swiftkv.layers.paged_attention.PagedAttention` calls them (``SWIFTKV_PAGED_ATTENTION=0``
switches both off there: then it gathers and calls PyTorch's SDPA).
"""

from __future__ import annotations

import ctypes

import torch

from swiftkv.kernels import build

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_FUNCTIONS = {
    "skv_paged_decode_attention": (ctypes.c_int, [_P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64,
                                                  ctypes.c_float, _I64, ctypes.c_int]),
    "skv_paged_prefill_attention": (ctypes.c_int, [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64,
                                                   _I64, ctypes.c_float, _I64, ctypes.c_int]),
}


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot run (no AVX2/FMA, no compiler)."""
    return build.load(_FUNCTIONS)


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
                     kv_lens: torch.Tensor) -> torch.Tensor:
    """One query per sequence over its cached keys and values.

    q [B, H, D]; k_cache, v_cache [Hkv, num_blocks, block_size, D] (contiguous, one KV owner's);
    block_tables [B, max_blocks] int64; kv_lens [B] int64 -> [B, H, D].
    """
    b, h, d = q.shape
    hkv, num_blocks, block_size = k_cache.shape[:3]
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the paged K/V cache must be contiguous")
    dtype = q.dtype
    q, tables, lens = q.float().contiguous(), block_tables.contiguous(), kv_lens.contiguous()
    out = torch.empty_like(q)
    rc = library().skv_paged_decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                                             lens.data_ptr(), out.data_ptr(), b, h, hkv, d, num_blocks, block_size,
                                             tables.shape[1], d**-0.5, int(k_cache.dtype == torch.bfloat16),
                                             torch.get_num_threads())
    _check(rc, "decode")
    return out.to(dtype)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      q_lens: torch.Tensor, kv_lens: torch.Tensor) -> torch.Tensor:
    """The last ``q_lens[s]`` of each sequence's ``kv_lens[s]`` cached tokens attend over its keys, bottom-right
    causal (a fresh prompt has ``q_len == kv_len``; a decode row ``q_len == 1``).

    q [sum(q_lens), H, D] (sequence after sequence); k_cache, v_cache [Hkv, num_blocks, block_size, D]
    (contiguous, one KV owner's, holding every key, this pass's included); block_tables [S, max_blocks]
    int64; q_lens, kv_lens [S] int64 -> [sum(q_lens), H, D].
    """
    t, h, d = q.shape
    hkv, num_blocks, block_size = k_cache.shape[:3]
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the paged K/V cache must be contiguous")
    if int(q_lens.sum()) != t:
        raise ValueError(f"{t} query tokens for q_lens summing to {int(q_lens.sum())}")
    dtype = q.dtype
    q, tables = q.float().contiguous(), block_tables.contiguous()
    q_lens, kv_lens = q_lens.contiguous(), kv_lens.contiguous()
    out = torch.empty_like(q)
    rc = library().skv_paged_prefill_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                                              q_lens.data_ptr(), kv_lens.data_ptr(), out.data_ptr(), len(q_lens), h, hkv,
                                              d, num_blocks, block_size, tables.shape[1], d**-0.5,
                                              int(k_cache.dtype == torch.bfloat16), torch.get_num_threads())
    _check(rc, "prefill")
    return out.to(dtype)
