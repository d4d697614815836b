"""Exact compact weights for the memory-bound matmuls of decode (CPU, AVX2).

Decode at small batch reads every weight once per token, so its speed is the bytes it reads. Two
narrower forms reproduce a float32 weight *bit for bit*, so nothing about the model changes (only
the summation order of the matmul, as between any two GEMM kernels):

- ``blocked8``: a weight dequantized from GGUF's Q4_1 or Q8_0 (the built-in model's are: Q4_1
  projections, a Q8_0 embedding / LM head) is, per block of 32 inputs, ``scale * q + offset`` with an
  integer ``q`` in [0, 255]: 1.25 bytes per weight instead of 4;
- ``bf16``: a weight whose values are bfloat16 numbers (checkpoints stored in bf16, most on the hub,
  and swiftkv's distilled tensors) loaded as float32: 2 bytes per weight.

:func:`to_compact` finds such a form (or returns None); :func:`matmul` runs it through a small C
kernel (built by :mod:`swiftkv.layers.native`): ``csrc/compact_gemv.c`` for up to
:data:`GEMV_ROWS` rows (memory bound: the bytes are the time), ``csrc/compact_gemm.c`` up to
:data:`GEMM_MAX_ROWS` rows (batched decode: weights dequantized per panel into cache, a
register-tiled micro-kernel; faster than oneDNN's fp32 GEMM, which must stream 4 bytes per weight).
Prefill-sized batches stay on oneDNN. ``SWIFTKV_COMPACT_WEIGHTS=0`` switches them off.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch

from swiftkv.layers import native

BLOCK = 32
MAX_ROWS = 8  # the gemv kernel's batch limit
# Which kernel by rows (2-core Zen 3, 20 layers of weights from DRAM): gemv is fastest up to 4 rows; the
# panel GEMM from there (32 rows: 45 ms vs oneDNN fp32 66 ms) until oneDNN catches up (equal at 256).
GEMV_ROWS = 4
GEMM_MAX_ROWS = 128


@dataclass
class CompactWeight:
    """A float32 weight ``[O, I]`` in fewer bytes, reproducing it bit for bit."""

    kind: str  # "blocked8" or "bf16"
    data: torch.Tensor  # blocked8: uint8 codes [O, I]; bf16: bfloat16 [O, I]
    scale: torch.Tensor | None = None  # blocked8: float32 [O, I / 32]
    offset: torch.Tensor | None = None  # blocked8: float32 [O, I / 32]

    @property
    def out_features(self) -> int:
        return self.data.shape[0]


@torch.no_grad()
def to_compact(weight: torch.Tensor) -> CompactWeight | None:
    """The narrowest exact form of a float32 CPU ``weight [O, I]``, or None if it has none."""
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.device.type != "cpu" or weight.shape[1] % 8:
        return None
    blocked = _to_blocked8(weight)
    if blocked is not None:
        return blocked
    as_bf16 = weight.detach().to(torch.bfloat16)
    if torch.equal(as_bf16.float(), weight):
        return CompactWeight("bf16", as_bf16.contiguous())
    return None


def _to_blocked8(weight: torch.Tensor) -> CompactWeight | None:
    """The exact blocked form of ``weight``, or None if it has none.

    Per block of 32: ``offset`` = the block minimum and ``scale`` = the fp16 step of a Q4_1 block
    (range / 15) or of a Q8_0 block (max |w| / 127); a block qualifies when every value is
    reproduced bit for bit. One block that does not qualify disqualifies the tensor."""
    if weight.shape[1] % BLOCK:
        return None
    O, I = weight.shape
    w = weight.detach().reshape(O, I // BLOCK, BLOCK)  # [O, blocks, 32]
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    best_q = best_scale = None
    for step in ((hi - lo) / 15, w.abs().amax(-1, keepdim=True) / 127):  # Q4_1, Q8_0
        scale = step.half().float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant blocks: q = 0
        q = torch.round((w - lo) / scale)
        ok = ((q >= 0) & (q <= 255) & (q * scale + lo == w)).all(-1, keepdim=True)  # [O, blocks, 1]
        if best_q is None:
            best_q, best_scale, best_ok = q, scale, ok
        else:
            best_q = torch.where(best_ok, best_q, q)
            best_scale = torch.where(best_ok, best_scale, scale)
            best_ok = best_ok | ok
        if bool(best_ok.all()):
            return CompactWeight("blocked8", best_q.to(torch.uint8).reshape(O, I).contiguous(),
                                 best_scale.reshape(O, -1).contiguous(), lo.reshape(O, -1).contiguous())
    return None


def matmul(x: torch.Tensor, cw: CompactWeight, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x [M, I] @ W^T (+ bias)`` with the faster compact kernel for ``M`` rows, or None where neither
    applies (``M`` above :data:`GEMM_MAX_ROWS`, kernel unavailable): then the caller's fp32 path runs."""
    m = x.shape[0]
    if 1 <= m <= GEMV_ROWS:
        return compact_matmul(x, cw, bias)
    if m <= GEMM_MAX_ROWS and gemm_kernel() is not None:
        return compact_gemm(x, cw, bias)
    return None


def compact_matmul(x: torch.Tensor, cw: CompactWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, I] @ W^T (+ bias)`` for ``M <= MAX_ROWS`` (float32)."""
    lib = kernel()
    if lib is None:
        raise RuntimeError("the compact-weight kernel is not available on this machine")
    M, I = x.shape
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"compact_matmul takes 1..{MAX_ROWS} rows, got {M}")
    x = x.contiguous()
    y = torch.empty(M, cw.out_features, dtype=torch.float32)
    threads = torch.get_num_threads()
    if cw.kind == "bf16":
        rc = lib.bf16_gemv(x.data_ptr(), M, I, cw.data.data_ptr(), y.data_ptr(), cw.out_features, threads)
    else:
        xsum = x.view(M, I // BLOCK, BLOCK).sum(-1)  # [M, blocks]: the offset term's input
        rc = lib.blocked_gemv(x.data_ptr(), xsum.data_ptr(), M, I, cw.data.data_ptr(), cw.scale.data_ptr(),
                              cw.offset.data_ptr(), y.data_ptr(), cw.out_features, threads)
    if rc != 0:
        raise RuntimeError(f"{cw.kind} gemv failed ({rc})")
    return y if bias is None else y + bias


_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_FUNCTIONS = {
    "blocked_gemv": (ctypes.c_int, [_P, _P, _I64, _I64, _P, _P, _P, _P, _I64, ctypes.c_int]),
    "bf16_gemv": (ctypes.c_int, [_P, _I64, _I64, _P, _P, _I64, ctypes.c_int]),
}


_GEMM_FUNCTIONS = {"compact_gemm": (ctypes.c_int, [ctypes.c_int, _P, _I64, _I64, _P, _P, _P, _P, _I64, ctypes.c_int])}


def compact_gemm(x: torch.Tensor, cw: CompactWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, I] @ W^T (+ bias)`` for any ``M`` (float32): weights dequantized per panel of 8 outputs
    into a cache-resident buffer, then a register-tiled micro-kernel (``csrc/compact_gemm.c``)."""
    lib = gemm_kernel()
    if lib is None:
        raise RuntimeError("the compact-weight GEMM kernel is not available on this machine")
    M, I = x.shape
    x = x.contiguous()
    y = torch.empty(M, cw.out_features, dtype=torch.float32)
    blocked = cw.kind == "blocked8"
    rc = lib.compact_gemm(0 if blocked else 1, x.data_ptr(), M, I, cw.data.data_ptr(),
                          cw.scale.data_ptr() if blocked else None, cw.offset.data_ptr() if blocked else None,
                          y.data_ptr(), cw.out_features, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"{cw.kind} gemm failed ({rc})")
    return y if bias is None else y + bias


def kernel() -> ctypes.CDLL | None:
    """The compiled gemv kernel (built on first use into the cache), or None where it cannot run:
    switched off, no AVX2/FMA, no C compiler (said once on stderr)."""
    return native.load("compact_gemv.c", _FUNCTIONS) if _switched_on() else None


def gemm_kernel() -> ctypes.CDLL | None:
    """The compiled GEMM kernel, or None where it cannot run (as :func:`kernel`)."""
    return native.load("compact_gemm.c", _GEMM_FUNCTIONS) if _switched_on() else None


def _switched_on() -> bool:
    return os.environ.get("SWIFTKV_COMPACT_WEIGHTS", "1") != "0"


def enabled() -> bool:
    return kernel() is not None
