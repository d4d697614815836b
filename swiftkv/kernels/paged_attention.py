"""Decode attention read in place from the paged KV cache (CPU; an fp32 or bf16 cache, fp32 arithmetic).

Without it, every layer of every decode step gathers each sequence's K/V blocks into a fresh
contiguous buffer and runs a batched attention over it. :func:`decode_attention` instead runs a
small C kernel (``csrc/skv_paged_attention.c``) that follows each sequence's block table: one pass over
the cached rows, the query heads of a KV head together. ``SWIFTKV_PAGED_ATTENTION=0`` switches it
off (then :class:`~swiftkv.layers.attention.AttentionMetadata` gathers, as before).
"""

from __future__ import annotations

import ctypes
import os

import torch

from swiftkv.kernels import build

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_FUNCTIONS = {
    "skv_paged_decode_attention": (ctypes.c_int, [_P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64,
                                                  ctypes.c_float, _I64, ctypes.c_int]),
}


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot run (switched off, no AVX2/FMA, no compiler)."""
    if os.environ.get("SWIFTKV_PAGED_ATTENTION", "1") == "0":
        return None
    return build.load(_FUNCTIONS)


def can_run(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether :func:`decode_attention` takes these tensors (CPU, fp32 or bf16 alike, head_dim % 8 == 0)."""
    return (q.dtype == kv_cache.dtype and q.dtype in (torch.float32, torch.bfloat16) and q.device.type == "cpu"
            and q.shape[-1] % 8 == 0 and library() is not None)


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
    if rc != 0:
        raise RuntimeError(f"paged decode attention failed ({'out of memory' if rc == -2 else 'bad shapes'})")
    return out.to(dtype)
