"""Attention read in place from the paged KV cache (CPU; an fp32 or bf16 cache, fp32 arithmetic).

Without it, every layer of every decode step gathers each sequence's K/V blocks into a fresh
contiguous buffer and runs a batched attention over it. :func:`decode_attention` instead runs a
small C kernel (``csrc/skv_paged_attention.c``) that follows each sequence's block table: one pass over
the cached rows, the query heads of a KV head together. :func:`prefill_attention` does the same for
prompts (fresh, after a cached prefix, or a chunk of one; ``csrc/skv_paged_prefill.c``): flash-attention
tiles, the group's query heads sharing each block of keys, the blocks right of the diagonal never read.
``SWIFTKV_PAGED_ATTENTION=0`` switches both off (then :class:`~swiftkv.layers.attention.AttentionMetadata`
gathers and calls PyTorch's SDPA, as before).
"""

from __future__ import annotations

import ctypes
import os
import sys

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
    """The compiled kernel, or None where it cannot run (switched off, no AVX2/FMA, no compiler)."""
    if os.environ.get("SWIFTKV_PAGED_ATTENTION", "1") == "0":
        return None
    return build.load(_FUNCTIONS)


def can_run(q: torch.Tensor, kv_cache: torch.Tensor, prefill: bool = False) -> bool:
    """Whether :func:`decode_attention` (or, with ``prefill``, :func:`prefill_attention`) takes these tensors:
    CPU, fp32 or bf16 alike, head_dim % 8 == 0; the prefill kernel also needs block_size % 4 == 0.
    ``kv_cache`` is any view whose last two dims are [block_size, D]."""
    return (q.dtype == kv_cache.dtype and q.dtype in (torch.float32, torch.bfloat16) and q.device.type == "cpu"
            and q.shape[-1] % 8 == 0 and (not prefill or kv_cache.shape[-2] % 4 == 0) and library() is not None)


_PREFILL_CHOICES = ("auto", "kernel", "sdpa")
_said_prefill: set[torch.dtype] = set()


def prefill_kernel_preferred(dtype: torch.dtype) -> bool:
    """Whether prompts' attention should run this kernel (fp32 FMAs over the paged cache) rather than PyTorch's
    SDPA over gathered blocks, for this CPU and compute dtype, decided from the CPU's flags (SDPA said once on stderr).
    ``SWIFTKV_PREFILL_ATTENTION=kernel|sdpa`` overrides. ``auto``: SDPA for bf16 on a CPU with AMX, whose
    oneDNN flash attention runs on the tiles (measured on a Sapphire Rapids-class Xeon, bf16, default model:
    prefill @ 2,048 1.8x with SDPA: 2,689 vs 1,500 tokens/s); this kernel everywhere else (Zen 4, bf16: 1.33x
    SDPA; AVX2 fp32: 1.4x)."""
    from swiftkv.platforms import cpu_flags

    choice = os.environ.get("SWIFTKV_PREFILL_ATTENTION", "auto")
    if choice not in _PREFILL_CHOICES:
        raise ValueError(f"SWIFTKV_PREFILL_ATTENTION={choice!r}: use one of {', '.join(_PREFILL_CHOICES)}")
    if choice == "auto":
        choice = "sdpa" if dtype == torch.bfloat16 and "amx_bf16" in cpu_flags() else "kernel"
        if choice == "sdpa" and dtype not in _said_prefill:  # the default (this kernel) goes unsaid
            _said_prefill.add(dtype)
            print("swiftkv: prefill attention: PyTorch's SDPA (oneDNN's flash attention on the AMX tiles) for bf16 "
                  "(SWIFTKV_PREFILL_ATTENTION=kernel overrides)", file=sys.stderr)
    return choice == "kernel"


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
