"""One-pass CPU kernels for the elementwise ops of a decoder layer: RMSNorm, SiLU-and-mul (gate and up
fused), rotary embedding in place (``csrc/skv_elementwise.c``, built by :mod:`swiftkv.kernels.build`).

vLLM's CPU backend has the same three custom ops. They run only where nothing needs gradients
(inference), on fp32 or bf16 CPU rows (bf16: computed in fp32 and rounded once, where PyTorch rounds after
each of its ops); elsewhere (training, GPUs, odd shapes) each op returns None and the layer
runs its PyTorch code. ``SWIFTKV_CPU_OPS=0`` switches them off. On a CPU with AVX512-BF16 (Zen 4, Sapphire Rapids
and later) they run sixteen lanes at a time (``csrc/skv_elementwise512.c``; Zen 4, bf16, 512 tokens of the default
model: 1.55x / 1.8x / 1.8x the AVX2 form); ``SWIFTKV_AVX512_OPS=0`` keeps them on AVX2.
"""

from __future__ import annotations

import ctypes

import torch

from swiftkv.kernels import build

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
class CRows(ctypes.Structure):
    """Mirror of ``skv_rows``: rows of fp32 or bf16 values, ``stride`` elements apart."""

    _fields_ = [("data", _P), ("rows", _I64), ("width", _I64), ("stride", _I64), ("form", _I64)]


_BINDING = build.Binding({
    "skv_rms_norm": (ctypes.c_int, [ctypes.POINTER(CRows), _P, _P, ctypes.c_float, ctypes.c_int]),
    "skv_silu_and_mul": (ctypes.c_int, [_P, _P, _I64, _P, _I64, _I64, ctypes.c_int, ctypes.c_int]),
    "skv_rotary_inplace": (ctypes.c_int, [ctypes.POINTER(CRows), _I64, _I64, _P, _P, ctypes.c_int]),
}, structs={5: CRows}, switch="SWIFTKV_CPU_OPS")


EW_BF16, EW_AVX512 = 1, 2  # csrc/skv_elementwise.h: the bits of a call's form


def avx512_available() -> bool:
    """Whether the elementwise kernels run their AVX-512 form: a CPU with AVX512-BF16 (its one-instruction bf16
    rounding), unless ``SWIFTKV_AVX512_OPS=0``."""
    return build.cpu_form("SWIFTKV_AVX512_OPS", "1", "avx512_bf16")


def _form(x: torch.Tensor) -> int:
    return EW_BF16 * (x.dtype == torch.bfloat16) | EW_AVX512 * avx512_available()


def _rows(x: torch.Tensor, rows: int, width: int, stride: int) -> ctypes.pointer:
    return ctypes.pointer(CRows(x.data_ptr(), rows, width, stride, _form(x)))


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run (switched off, no AVX2/FMA, no compiler)."""
    return _BINDING.library()


def _takes(*tensors: torch.Tensor) -> bool:
    """All fp32 or all bf16, on CPU, no gradient wanted, kernels built."""
    dt = tensors[0].dtype
    return (not torch.is_grad_enabled() and dt in (torch.float32, torch.bfloat16)
            and all(t.dtype == dt and t.device.type == "cpu" for t in tensors) and library() is not None)


def as_fp32(t: torch.Tensor) -> torch.Tensor:
    """A small operand (norm weight, cos/sin rows, a step's hidden rows) as contiguous fp32, no copy where it is
    one already (bf16 values widen exactly)."""
    return t.detach().float().contiguous()


def _check(rc: int, op: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{op}: shapes the CPU kernel cannot take")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x [..., N] -> normalised [..., N], scaled by ``weight``; None where the kernel does not take it
    (gradients wanted, not fp32 CPU, N % 8, last dim strided, kernel not built)."""
    n = x.shape[-1]
    if n % 8 or x.stride(-1) != 1 or not _takes(x) or weight.device.type != "cpu":
        return None
    x2 = x.reshape(-1, n)  # [M, N]; a view when rows are evenly spaced
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype)
    w = as_fp32(weight)
    _check(library().skv_rms_norm(_rows(x2, x2.shape[0], n, x2.stride(0)), w.data_ptr(), out.data_ptr(), eps,
                                  torch.get_num_threads()), "rms_norm")
    return out.view(x.shape)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for gate, up [M, I] (rows evenly spaced, the same spacing) -> [M, I]; None where
    the kernel does not take them."""
    if gate.dim() != 2 or gate.shape != up.shape or gate.shape[1] % 8 or not _takes(gate, up):
        return None
    if gate.stride(1) != 1 or up.stride(1) != 1 or gate.stride(0) != up.stride(0):
        gate, up = gate.contiguous(), up.contiguous()
    m, i = gate.shape
    out = torch.empty(m, i, dtype=gate.dtype)
    _check(library().skv_silu_and_mul(gate.data_ptr(), up.data_ptr(), gate.stride(0), out.data_ptr(), m, i,
                                      torch.get_num_threads(), _form(gate)), "silu_and_mul")
    return out


def rotary_inplace(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """Rotate every head of x [N, heads, D] (token rows evenly spaced, a token's heads contiguous,
    D % 16 == 0) in place and return it; cos, sin [N, D]. None (x untouched) where the kernel does not take it."""
    n, heads, d = x.shape
    if d % 16 or x.stride(2) != 1 or x.stride(1) != d or not _takes(x) or cos.device.type != "cpu":
        return None
    cos, sin = as_fp32(cos), as_fp32(sin)
    _check(library().skv_rotary_inplace(_rows(x, n, heads * d, x.stride(0)), heads, d, cos.data_ptr(), sin.data_ptr(),
                                        torch.get_num_threads()), "rotary_inplace")
    return x
