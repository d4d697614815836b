"""Bindings of ``csrc/skv_fused_decode.c``: a decode step's decoder layers, and SingleInputKV's K/V
store, each in one call. The structs are mirrored here and checked against the library's own layout
when it loads. ``SWIFTKV_FUSED_DECODE=0`` switches it off; so does switching off any kernel it is made of.
"""

from __future__ import annotations

import ctypes

from swiftkv.kernels import build, elementwise, paged_attention
from swiftkv.kernels import linear as linear_kernels
from swiftkv.kernels.linear import CWeight

_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class CLayer(ctypes.Structure):
    """Mirror of ``skv_layer``."""

    _fields_ = [("input_norm", _P), ("post_norm", _P), ("q", CWeight), ("k", CWeight), ("v", CWeight),
                ("o", CWeight), ("gate", CWeight), ("up", CWeight), ("down", CWeight), ("owner", _I64),
                ("swiftkv", _I64)]


STEP_EW512 = 4  # csrc/skv_fused_decode.h: a ``dots`` bit, the elementwise ops' AVX-512 form


class CStep(ctypes.Structure):
    """Mirror of ``skv_step``."""

    _fields_ = [("M", _I64), ("hidden", _I64), ("H", _I64), ("Hkv", _I64), ("D", _I64), ("intermediate", _I64),
                ("eps", ctypes.c_float), ("h", _P), ("cos", _P), ("sin", _P), ("kv_cache", _P),
                ("num_blocks", _I64), ("block_size", _I64), ("max_blocks", _I64), ("kv_bf16", _I64), ("slots", _P),
                ("block_tables", _P), ("kv_lens", _P), ("scratch", _P), ("gemv_rows", _I64), ("dots", _I64),
                ("nthreads", ctypes.c_int)]


class CStoreKV(ctypes.Structure):
    """Mirror of ``skv_store_kv``."""

    _fields_ = [("norm", _P), ("kv", ctypes.POINTER(CWeight)), ("owners", _P), ("n", _I64)]


_BINDING = build.Binding({
    "skv_fused_decode_layers": (ctypes.c_int, [_P, _I64, ctypes.POINTER(CStep)]),
    "skv_fused_decode_scratch_floats": (_I64, [_I64] * 6),
    "skv_fused_decode_store_kv": (ctypes.c_int, [ctypes.POINTER(CStoreKV), ctypes.POINTER(CStep)]),
    "skv_fused_decode_store_kv_scratch_floats": (_I64, [_I64] * 3),
    "skv_fused_decode_swiftkv": (ctypes.c_int, [_P, _I64, _I64, ctypes.POINTER(CStoreKV), ctypes.POINTER(CStep)]),
    "skv_parallel_regions": (_I64, []),
}, structs={1: CLayer, 2: CStep, 3: CStoreKV})


def library() -> ctypes.CDLL | None:
    """The library, or None where the fused calls cannot run: any kernel they are made of switched off, no
    AVX2/FMA/F16C, no compiler (the engine's own switch, ``SWIFTKV_FUSED_DECODE``, is in
    :class:`~swiftkv.kernels.switches.KernelSwitches`)."""
    if not (linear_kernels.library() and elementwise.library() and paged_attention.library()):
        return None
    return _BINDING.library()


def run_layers(layers: ctypes.Array, start: int, end: int, step: CStep) -> None:
    """``layers[start:end]`` on the step (its ``h`` is updated in place)."""
    _check(library().skv_fused_decode_layers(ctypes.byref(layers, start * ctypes.sizeof(CLayer)), end - start,
                                             ctypes.byref(step)))


def store_kv(store: CStoreKV, step: CStep) -> None:
    """SingleInputKV's K/V of every later KV owner from ``step.h`` into the paged cache."""
    _check(library().skv_fused_decode_store_kv(ctypes.byref(store), ctypes.byref(step)))


def run_swiftkv(layers: ctypes.Array, l: int, store: CStoreKV, step: CStep) -> None:
    """A SwiftKV step in one call: ``layers[:l]``, :func:`store_kv` from their output, ``layers[l:]``."""
    _check(library().skv_fused_decode_swiftkv(ctypes.byref(layers), l, len(layers), ctypes.byref(store),
                                              ctypes.byref(step)))


def parallel_regions() -> int:
    """How many OpenMP regions the library's kernels have opened so far (a fused call opens one for all of its
    kernels; each kernel called alone opens its own)."""
    return library().skv_parallel_regions()


def layers_scratch_floats(m: int, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int) -> int:
    return library().skv_fused_decode_scratch_floats(m, hidden, heads, kv_heads, head_dim, intermediate)


def store_kv_scratch_floats(m: int, hidden: int, row: int) -> int:
    return library().skv_fused_decode_store_kv_scratch_floats(m, hidden, row)


def _check(rc: int) -> None:
    if rc != 0:
        raise RuntimeError(f"fused decode failed ({'out of memory' if rc == -2 else 'bad shapes'})")
