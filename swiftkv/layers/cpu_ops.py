"""One-pass CPU kernels for the elementwise ops of a decoder layer: RMSNorm, SiLU-and-mul (gate and up
fused), rotary embedding in place (``csrc/elementwise.c``, built by :mod:`swiftkv.layers.native`).

vLLM's CPU backend has the same three custom ops. They run only where nothing needs gradients
(inference), on contiguous fp32 CPU rows; the layers keep their PyTorch code for everything else
(training, bf16, GPUs). ``SWIFTKV_CPU_OPS=0`` switches them off.
"""

from __future__ import annotations

import ctypes
import os

import torch

from swiftkv.layers import native

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_FUNCTIONS = {
    "rms_norm": (ctypes.c_int, [_P, _I64, _P, _P, _I64, _I64, ctypes.c_float, ctypes.c_int]),
    "silu_and_mul": (ctypes.c_int, [_P, _P, _I64, _I64, ctypes.c_int]),
    "rotary_inplace": (ctypes.c_int, [_P, _I64, _I64, _I64, _I64, _P, _P, ctypes.c_int]),
}


def kernel() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run (switched off, no AVX2/FMA, no compiler)."""
    if os.environ.get("SWIFTKV_CPU_OPS", "1") == "0":
        return None
    return native.load("elementwise.c", _FUNCTIONS)


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: fp32 on CPU, no gradient wanted, kernels built."""
    return (not torch.is_grad_enabled() and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and kernel() is not None)


def _check(rc: int, op: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{op}: shapes the CPU kernel cannot take")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., N] (last dim contiguous, N % 8 == 0) -> normalised [..., N], scaled by ``weight``."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)  # [M, N]; a view when rows are evenly spaced
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype)
    _check(kernel().rms_norm(x2.data_ptr(), x2.stride(0), weight.data_ptr(), out.data_ptr(), x2.shape[0], n, eps,
                             torch.get_num_threads()), "rms_norm")
    return out.view(x.shape)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [M, 2I] (gate then up) -> silu(gate) * up [M, I]."""
    x = x.contiguous()
    m, i = x.shape[0], x.shape[1] // 2
    out = torch.empty(m, i, dtype=x.dtype)
    _check(kernel().silu_and_mul(x.data_ptr(), out.data_ptr(), m, i, torch.get_num_threads()), "silu_and_mul")
    return out


def rotary_inplace(x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate the first ``heads`` heads of x [N, heads_total, D] (token rows evenly spaced, heads
    contiguous) in place; cos, sin [N, D]."""
    n, _, d = x.shape
    if x.stride(2) != 1 or x.stride(1) != d:
        raise ValueError("rotary_inplace needs each token's heads contiguous")
    cos, sin = cos.contiguous(), sin.contiguous()
    _check(kernel().rotary_inplace(x.data_ptr(), n, heads, d, x.stride(0), cos.data_ptr(), sin.data_ptr(),
                                   torch.get_num_threads()), "rotary_inplace")
