"""Decoder layers of a decode step in one native call (CPU, fp32 activations, compact weights).

Eager decode runs ~20 small ops per layer from Python. On the default model at batch 1 that costs
~13 ms of a ~34 ms step (measured: the same 30 layers at tiny widths still take 13 ms a step). What
CUDA graphs do for vLLM on a GPU, :class:`FusedDecoder` does here: it hands a run of layers to one C
function (``csrc/fused_decode.c``) that calls the same kernels the layers call one by one (compact
gemv / panel GEMM, RMSNorm, rotary, the K/V store, paged attention, SiLU-and-mul) in the same order,
so its output equals eager decode up to float rounding.

It applies to steps whose queries are one token per sequence over the paged cache (decode, and
SwiftKV's later layers of any step), up to ``GEMM_MAX_ROWS`` sequences, when no gradient is wanted,
and to models whose every projection has a compact form, with SiLU and no SwiftKV adapters
(:meth:`FusedDecoder.build` returns None otherwise). Elsewhere the Python layers run (eager mode).
``SWIFTKV_FUSED_DECODE=0`` switches it off; so does switching off any kernel it is made of.
"""

from __future__ import annotations

import ctypes
import os

import torch
import torch.nn.functional as F

from swiftkv.config import SwiftKVConfig
from swiftkv.layers import compact_weights, cpu_ops, native, paged_attention
from swiftkv.layers.linear import InferenceLinear

_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class _Weight(ctypes.Structure):
    _fields_ = [("kind", _I64), ("q", _P), ("scale", _P), ("offset", _P), ("bias", _P),
                ("out_features", _I64), ("in_features", _I64)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _P), ("post_norm", _P), ("qkv", _Weight), ("o", _Weight), ("gate_up", _Weight),
                ("down", _Weight), ("owner", _I64), ("swiftkv", _I64)]


class _Step(ctypes.Structure):
    _fields_ = [("M", _I64), ("hidden", _I64), ("H", _I64), ("Hkv", _I64), ("D", _I64), ("intermediate", _I64),
                ("eps", ctypes.c_float), ("h", _P), ("cos", _P), ("sin", _P), ("kv_cache", _P),
                ("num_blocks", _I64), ("block_size", _I64), ("max_blocks", _I64), ("slots", _P),
                ("block_tables", _P), ("kv_lens", _P), ("scratch", _P), ("gemv_rows", _I64), ("nthreads", ctypes.c_int)]


class _StoreKV(ctypes.Structure):
    _fields_ = [("norm", _P), ("kv", _Weight), ("owners", _P), ("n", _I64)]


_FUNCTIONS = {
    "fused_decode_layers": (ctypes.c_int, [_P, _I64, _P]),
    "fused_decode_scratch_floats": (_I64, [_I64] * 6),
    "fused_decode_store_kv": (ctypes.c_int, [_P, _P]),
    "fused_decode_store_kv_scratch_floats": (_I64, [_I64] * 3),
}


def kernel() -> ctypes.CDLL | None:
    """The compiled layers, or None where they cannot run: switched off (itself or any kernel it is
    made of), no AVX2/FMA, no compiler."""
    if os.environ.get("SWIFTKV_FUSED_DECODE", "1") == "0":
        return None
    if not (compact_weights.enabled() and compact_weights.gemm_kernel() and cpu_ops.kernel() and paged_attention.kernel()):
        return None
    return native.load("fused_decode.c", _FUNCTIONS)


def _weight(lin) -> _Weight | None:
    """The C view of an inference projection, or None if it has no compact form."""
    if not isinstance(lin, InferenceLinear) or lin.compact is None:
        return None
    if lin.bias is not None and (lin.bias.dtype != torch.float32 or not lin.bias.is_contiguous()):
        return None
    cw = lin.compact
    blocked = cw.kind == "blocked8"
    return _Weight(0 if blocked else 1, cw.data.data_ptr(), cw.scale.data_ptr() if blocked else None,
                   cw.offset.data_ptr() if blocked else None, None if lin.bias is None else lin.bias.data_ptr(),
                   cw.data.shape[0], cw.data.shape[1])


class FusedDecoder:
    """The model's decoder layers as C descriptors (built once; the weights must not change after)."""

    def __init__(self, model) -> None:
        self.model = model
        cfg, attn = model.config, model.model.layers[0].self_attn
        self.dims = (cfg.hidden_size, attn.num_heads, attn.num_kv_heads, attn.head_dim, cfg.intermediate_size)
        self.eps = float(model.model.layers[0].input_layernorm.eps)
        self._arrays: dict[tuple, ctypes.Array | None] = {}
        # every tensor a descriptor points into: kept alive here, so a later change to the model (against
        # the rule above) leaves stale values, never dangling pointers
        self._alive: list = []
        self._store = self._store_kv()

    @classmethod
    def build(cls, model) -> FusedDecoder | None:
        """A decoder for ``model`` (after ``fuse_for_inference``), or None where it does not apply."""
        if kernel() is None:
            return None
        layers, decoder = model.model.layers, cls(model)
        hidden, _, _, d, inter = decoder.dims
        if hidden % 8 or d % 16 or inter % 8:
            return None
        if any(layer.mlp.act is not F.silu or layer.mlp_adapter_swiftkv is not None
               or layer.self_attn.o_adapter_swiftkv is not None for layer in layers):
            return None
        norms = [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        if any(n.weight.dtype != torch.float32 or n.weight.device.type != "cpu" or n.eps != norms[0].eps for n in norms):
            return None
        return decoder if decoder._layers(model.swiftkv_config, True) is not None else None

    def _layers(self, skv: SwiftKVConfig, swiftkv: bool) -> ctypes.Array | None:
        """Every layer's descriptor for layout ``skv`` (SwiftKV layers on their SingleInputKV path when
        ``swiftkv``), or None if a projection it needs has no compact form."""
        key = (skv.num_layers, skv.num_key_value_layers, skv.key_value_group_size, swiftkv)
        if key not in self._arrays:
            descs = []
            for i, layer in enumerate(self.model.model.layers):
                attn, mlp, swift = layer.self_attn, layer.mlp, swiftkv and skv.is_swiftkv_layer(i)
                lins = [attn.q_proj_swiftkv.forward if swift else attn.qkv, attn.o_proj.forward, mlp.gate_up,
                        mlp.down_proj.forward]
                ws = [_weight(lin) for lin in lins]
                if any(w is None for w in ws):
                    descs = None
                    break
                norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
                self._alive += norms + lins
                descs.append(_Layer(*(n.data_ptr() for n in norms), *ws, skv.kv_owner(i), int(swift)))
            self._arrays[key] = None if descs is None else (_Layer * len(descs))(*descs)
        return self._arrays[key]

    def run(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta, skv: SwiftKVConfig, start: int,
            end: int, swiftkv: bool) -> torch.Tensor | None:
        """Layers ``start..end-1`` on ``h [M, hidden]`` (one query per sequence over the paged cache);
        None (nothing done) where the step is not one it takes."""
        layers = self._layers(skv, swiftkv)
        stores = any(not (swiftkv and skv.is_swiftkv_layer(i)) for i in range(start, end))
        if layers is None or (lib := self._takes(h, meta, stores)) is None:
            return None
        h = h.contiguous().clone()  # updated in place
        hidden, heads, kv_heads, d, inter = self.dims
        scratch = torch.empty(lib.fused_decode_scratch_floats(h.shape[0], hidden, heads, kv_heads, d, inter))
        step, _keep = self._step(h, cos, sin, meta, stores, scratch)
        _check(lib.fused_decode_layers(ctypes.byref(layers, start * ctypes.sizeof(_Layer)), end - start,
                                       ctypes.byref(step)))
        return h

    def store_swiftkv(self, h_l: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta) -> bool:
        """SingleInputKV's K/V of every later KV owner from ``h_l [M, hidden]`` into the paged cache
        (:meth:`~swiftkv.models.llama.SwiftKVCausalLM.store_swiftkv` in one call); False where the step
        is not one it takes (then nothing was done)."""
        store = self._store
        if store is None or (lib := self._takes(h_l, meta, True)) is None:
            return False
        h_l = h_l.contiguous()
        scratch = torch.empty(lib.fused_decode_store_kv_scratch_floats(h_l.shape[0], self.dims[0],
                                                                       store.kv.out_features))
        step, _keep = self._step(h_l, cos, sin, meta, True, scratch)
        _check(lib.fused_decode_store_kv(ctypes.byref(store), ctypes.byref(step)))
        return True

    def _store_kv(self) -> _StoreKV | None:
        """The SingleInputKV store's descriptor (None: not a SwiftKV model, or no compact form)."""
        m, skv = self.model, self.model.swiftkv_config
        kv = _weight(getattr(m.model, "kv_proj_swiftkv_fused", None))
        norm = getattr(m.model, "norm_swiftkv", None)
        if kv is None or norm is None or norm.weight.dtype != torch.float32 or norm.eps != self.eps:
            return None
        owners = torch.tensor([skv.kv_owner(i) for i in skv.group_leaders])
        self._alive += [norm.weight, m.model.kv_proj_swiftkv_fused, owners]
        return _StoreKV(norm.weight.data_ptr(), kv, owners.data_ptr(), len(owners))

    def _takes(self, h: torch.Tensor, meta, stores: bool) -> ctypes.CDLL | None:
        """The library, where the step is one the fused calls take: one query per sequence over an fp32
        CPU paged cache, at most ``GEMM_MAX_ROWS`` rows, no gradient, slots known where K/V are stored."""
        cache = meta.kv_cache
        if (cache is None or torch.is_grad_enabled() or not 1 <= h.shape[0] <= compact_weights.GEMM_MAX_ROWS
                or h.dtype != torch.float32 or cache.dtype != torch.float32 or h.device.type != "cpu"
                or not cache.is_contiguous() or any(n != 1 for n in meta.q_lens)
                or (stores and meta.slot_mapping is None)):
            return None
        return kernel()

    def _step(self, h, cos, sin, meta, stores: bool, scratch: torch.Tensor) -> tuple[_Step, list[torch.Tensor]]:
        """The C view of this step, and the tensors it points into (to keep alive during the call)."""
        hidden, heads, kv_heads, d, inter = self.dims
        cos, sin, kv_lens = cos.contiguous(), sin.contiguous(), meta.kv_lens_tensor()
        cache, tables = meta.kv_cache, meta.block_tables.contiguous()
        slots = meta.slot_mapping.contiguous() if stores else None
        step = _Step(h.shape[0], hidden, heads, kv_heads, d, inter, self.eps, h.data_ptr(), cos.data_ptr(),
                     sin.data_ptr(), cache.data_ptr(), cache.shape[3], cache.shape[4], tables.shape[1],
                     None if slots is None else slots.data_ptr(), tables.data_ptr(), kv_lens.data_ptr(),
                     scratch.data_ptr(), compact_weights.GEMV_ROWS, torch.get_num_threads())
        return step, [cos, sin, kv_lens, tables, slots, scratch]


def _check(rc: int) -> None:
    if rc != 0:
        raise RuntimeError(f"fused decode failed ({'out of memory' if rc == -2 else 'bad shapes'})")
