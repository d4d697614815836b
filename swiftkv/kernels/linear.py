"""Bindings of the matmul kernels over weights in their held form (``csrc/skv_weight.h``): ``skv_linear``
(decode: gemv up to :data:`GEMV_ROWS` rows, the panel GEMM up to :data:`GEMM_MAX_ROWS`) and ``skv_widen``
(rows widened to fp32 or bf16 for a GEMM library). Tensors in, tensors out; ``SWIFTKV_COMPACT_WEIGHTS=0``
switches them off (then layers hold their weights densely in the compute dtype, as PyTorch needs them).
"""

from __future__ import annotations

import ctypes

import torch

from swiftkv.kernels import build

KINDS = {"q8": 0, "bf16": 1, "q4": 2, "f32": 3}  # csrc/skv_weight.h
# Which kernel by rows (2-core Zen 3, 20 layers of weights from DRAM): gemv is fastest up to 4 rows; the
# panel GEMM from there (32 rows: 45 ms vs oneDNN fp32 66 ms) until oneDNN catches up (equal at 256).
GEMV_ROWS = 4
GEMM_MAX_ROWS = 128

_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class CWeight(ctypes.Structure):
    """Mirror of ``skv_weight`` (checked against the library when it loads)."""

    _fields_ = [("kind", _I64), ("q", _P), ("scale", _P), ("offset", _P), ("bias", _P), ("out_features", _I64),
                ("in_features", _I64)]


_BINDING = build.Binding({
    "skv_linear": (ctypes.c_int, [ctypes.POINTER(CWeight), _P, _I64, _P, _I64, _I64, _I64, ctypes.c_int]),
    "skv_gemm_i8": (ctypes.c_int,
                    [ctypes.POINTER(CWeight), _P, ctypes.c_int, _I64, _P, ctypes.c_int, _I64, ctypes.c_int]),
    "skv_amx_init": (ctypes.c_int, []),
    "skv_widen": (ctypes.c_int, [ctypes.POINTER(CWeight), _I64, _I64, _P, _I64, _I64, ctypes.c_int]),
}, structs={0: CWeight}, switch="SWIFTKV_COMPACT_WEIGHTS")


def library() -> ctypes.CDLL | None:
    """The kernel library, or None where the matmul kernels cannot run (switched off, no AVX2/FMA/F16C, no
    compiler)."""
    return _BINDING.library()


def c_weight(kind: str, data: torch.Tensor, scale: torch.Tensor | None = None, offset: torch.Tensor | None = None,
             bias: torch.Tensor | None = None, in_features: int | None = None) -> CWeight:
    """The C view of a held weight (the tensors must outlive it). ``data``: codes or values ``[O, ...]``;
    ``bias``: fp32 ``[O]`` or None."""
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        raise ValueError("the kernels take a contiguous fp32 bias")
    ptr = (lambda t: None if t is None else t.data_ptr())
    return CWeight(KINDS[kind], data.data_ptr(), ptr(scale), ptr(offset), ptr(bias), data.shape[0],
                   in_features if in_features is not None else data.shape[1])


def bf16_dot_available() -> bool:
    """Whether this CPU has AVX512-BF16 dot products (then a bf16 model's batched matmuls use them: twice the
    fp32 FMA's work per instruction). ``SWIFTKV_BF16_DOT=0`` switches them off."""
    return build.cpu_form("SWIFTKV_BF16_DOT", "1", "avx512_bf16")


def int8_dot_available() -> bool:
    """Whether a bf16 model's matmuls over Q4/Q8-held weights may quantize each block of 32 activations to int8
    and multiply with AVX512-VNNI (llama.cpp's Q8 activations; the gemv up to ``GEMV_ROWS`` rows, the panel GEMM
    above): opt-in, ``SWIFTKV_INT8_DOT=1``, on a CPU with ``avx512_vnni``. Off by default: on the default model (Zen 4,
    alternated in one process) prefill runs 1.26x / 1.22x faster at 512 / 2,048 tokens, batch-1 decode 1.10x, batch 32
    1.07x, but its chosen-token logprobs sit 0.077 (mean) / 0.60 (max) from the fp32 model's, against bf16's 0.018 /
    0.093 (teacher-forced, 6 chat prompts x 32 tokens)."""
    return build.cpu_form("SWIFTKV_INT8_DOT", "0", "avx512_vnni")


def amx_available() -> bool:
    """Whether a bf16 model's batched matmuls (above ``GEMV_ROWS`` rows, up to ``GEMM_MAX_ROWS``) run on the AMX-BF16
    tiles (``csrc/skv_gemm_amx.c``: the AVX512-BF16 panel GEMM's values on the tiles' dot products): a CPU with
    ``amx_bf16`` whose kernel Linux lets this process use the tiles. ``SWIFTKV_AMX_DECODE=0`` switches them off."""
    global _amx_granted
    if not build.cpu_form("SWIFTKV_AMX_DECODE", "1", "amx_bf16") or not bf16_dot_available() or library() is None:
        return False
    if _amx_granted is None:  # asked once per process (the grant is the process's)
        _amx_granted = library().skv_amx_init() == 0
    return _amx_granted


_amx_granted: bool | None = None
DOT_BF16, DOT_I8, DOT_AMX = 1, 2, 8  # csrc/skv_linear.h


def linear(x: torch.Tensor, w: CWeight, out: torch.Tensor | None = None, bf16_dot: bool = False,
           int8_dot: bool = False, amx: bool = False) -> torch.Tensor:
    """``x [M, I] (fp32) @ W^T (+ bias)`` -> ``[M, O]`` fp32 (into ``out`` when given). ``bf16_dot`` (only where
    :func:`bf16_dot_available`): above ``GEMV_ROWS`` rows (a dense bf16 weight: from 1 row), x and W rounded to
    bf16 and multiplied with AVX512-BF16 dot products, summed in fp32 -- what a bf16 model computes. ``int8_dot`` (only where :func:`int8_dot_available`):
    a Q4/Q8-held weight, each block of 32 activations quantized to int8 (scale
    max|x| / 127, nearest even) and multiplied with AVX512-VNNI, the blocks' sums scaled in fp32. ``amx`` (only where
    :func:`amx_available`): above ``GEMV_ROWS`` rows ``bf16_dot``'s values on the AMX-BF16 tiles, ahead of the
    others."""
    lib = library()
    if lib is None:
        raise RuntimeError("the matmul kernels are not available on this machine")
    if amx and not _amx_granted:  # a tile instruction before Linux's grant would kill the process
        raise RuntimeError("linear(amx=True) needs amx_available() first")
    x = x.contiguous()
    m = x.shape[0]
    y = torch.empty(m, w.out_features, dtype=torch.float32) if out is None else out
    dots = DOT_BF16 * bf16_dot | DOT_I8 * int8_dot | DOT_AMX * amx
    rc = lib.skv_linear(ctypes.byref(w), x.data_ptr(), m, y.data_ptr(), y.stride(0), GEMV_ROWS, dots,
                        torch.get_num_threads())
    _check(rc, "skv_linear")
    return y


def linear_int8(x: torch.Tensor, w: CWeight) -> torch.Tensor:
    """``x [M, I] @ W^T (+ W's bias)`` -> ``[M, O]`` in ``x``'s dtype (fp32 or bf16) for a Q4/Q8-held weight (only where
    :func:`int8_dot_available`), any M: each block of 32 activations quantized to int8 once (the rows shared out
    among the threads), then the AVX512-VNNI panel GEMM -- :func:`linear`'s ``int8_dot`` arithmetic, without the
    fp32 copies around it."""
    lib = library()
    if lib is None:
        raise RuntimeError("the matmul kernels are not available on this machine")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"linear_int8() takes fp32 or bf16 activations, not {x.dtype}")
    x = x.contiguous()
    y = torch.empty(x.shape[0], w.out_features, dtype=x.dtype)
    bf16 = int(x.dtype == torch.bfloat16)
    _check(lib.skv_gemm_i8(ctypes.byref(w), x.data_ptr(), bf16, x.shape[0], y.data_ptr(), bf16, y.stride(0),
                           torch.get_num_threads()), "skv_gemm_i8")
    return y


def widen(w: CWeight, start: int, rows: int, out: torch.Tensor) -> torch.Tensor:
    """Rows ``start : start + rows`` of ``W`` into ``out [rows, I]`` (fp32 or bf16, contiguous; bf16 from Q4/Q8 codes
    with AVX-512 where :func:`bf16_dot_available`)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the matmul kernels are not available on this machine")
    if out.dtype not in (torch.float32, torch.bfloat16) or not out.is_contiguous() or out.shape[0] < rows:
        raise ValueError("widen() writes a contiguous fp32 or bf16 [rows, in_features] tensor")
    bf16 = out.dtype == torch.bfloat16
    _check(lib.skv_widen(ctypes.byref(w), start, rows, out.data_ptr(), int(bf16),
                         DOT_BF16 if bf16 and bf16_dot_available() else 0, torch.get_num_threads()), "skv_widen")
    return out


def _check(rc: int, op: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{op} failed ({'out of memory' if rc == -2 else 'shapes the kernel cannot take'})")
