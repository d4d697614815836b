"""Causal attention of a fresh prompt on the AMX-BF16 tiles (``csrc/skv_flash_amx.c``): bf16 queries, keys and values
straight from the QKV projection's output, fp32 scores and softmax, bf16 out -- PyTorch's bf16 flash attention's
values, to summation order and its exp. Prompts without cached keys run it on a CPU with AMX
(``SWIFTKV_PREFILL_ATTENTION`` ``auto`` or ``amx``: :func:`swiftkv.layers.paged_attention.fresh_prompts_on_amx`).
"""

from __future__ import annotations

import ctypes
import math

import torch

from swiftkv.kernels import build
from swiftkv.kernels import linear as linear_kernels

_P, _I64 = ctypes.c_void_p, ctypes.c_int64

_BINDING = build.Binding({
    "skv_flash_attention_amx": (ctypes.c_int, [_P, _I64, _P, _I64, _P, _I64, _P, _I64, _I64, _I64, _I64, _I64,
                                               ctypes.c_float, ctypes.c_int]),
})


def can_run(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether :func:`causal_attention` takes heads of ``head_dim`` in ``dtype`` on this machine: bf16, head_dim 32,
    64, 96 or 128, a CPU whose AMX tiles the kernels may use (:func:`~swiftkv.kernels.linear.amx_available`)."""
    return (dtype == torch.bfloat16 and head_dim % 32 == 0 and 0 < head_dim <= 128 and linear_kernels.amx_available()
            and _BINDING.library() is not None)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One prompt's causal attention: q ``[T, H, D]``, k / v ``[T, Hkv, D]`` (bf16; rows may be strided, heads and
    dims contiguous) -> ``[T, H, D]`` bf16, query ``t`` over keys ``0..t`` (grouped-query: head ``h`` reads KV head
    ``h // (H / Hkv)``). Only where :func:`can_run`."""
    if not can_run(q.shape[-1], q.dtype):  # also asks Linux for the tiles (a tile instruction before that is fatal)
        raise RuntimeError(f"causal_attention() cannot run here (bf16, head_dim 32-128 by 32, AMX tiles): "
                           f"{q.dtype}, head_dim {q.shape[-1]}")
    T, H, D = q.shape
    hkv = k.shape[1]
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != torch.bfloat16 or t.shape[0] != T or t.shape[2] != D or t.stride(2) != 1 or t.stride(1) != D:
            raise ValueError(f"causal_attention(): {name} must be bf16 [T, heads, {D}] with contiguous heads")
    if v.shape[1] != hkv or H % hkv:
        raise ValueError(f"causal_attention(): {H} query heads cannot share {hkv} / {v.shape[1]} KV heads")
    out = torch.empty(T, H, D, dtype=torch.bfloat16)
    rc = _BINDING.library().skv_flash_attention_amx(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(),
                                                    v.stride(0), out.data_ptr(), out.stride(0), T, H, hkv, D,
                                                    1.0 / math.sqrt(D), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"AMX flash attention failed ({'out of memory' if rc == -2 else 'shapes it cannot take'})")
    return out
