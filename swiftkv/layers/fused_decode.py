"""Decoder layers of a decode step in one native call (CPU; weights in their held form, fp32 arithmetic).

Eager decode runs ~20 small ops per layer from Python. On the default model at batch 1 that costs
~13 ms of a ~34 ms step (measured: the same 30 layers at tiny widths still take 13 ms a step). What
CUDA graphs do for vLLM on a GPU, :class:`FusedDecoder` does here: it hands a run of layers to one C
function (:mod:`swiftkv.kernels.fused_decode`) that calls the same kernels the layers call one by one
(gemv / panel GEMM on the held weights, RMSNorm, rotary, the K/V store, paged attention, SiLU-and-mul) in
the same order, so its output equals eager decode up to float rounding.

It is built by the model runner from the descriptions the layers give (:class:`FusedDecodeSpec`), and is a layer
executor like the model itself (the same ``run_layers``, ``store_swiftkv`` and ``run_all_layers``): the runner hands
it to the model for the steps it takes (:meth:`FusedDecoder.takes`: one query token per sequence over the paged cache,
up to ``GEMM_MAX_ROWS`` sequences, no gradient wanted; on a CPU with AMX its matmuls run on the kernels' AMX tiles,
and only where those cannot run does a model computing in bf16 on bf16 weights leave steps of enough rows
(``AMX_EAGER_MIN_WORK``) to the eager layers, whose matmuls oneDNN runs on the tiles),
chosen once per step. Each call runs all its kernels inside one OpenMP region, its threads meeting at a spin barrier
between dependent ops (``csrc/skv_team.h``). A model computing in bf16 (a bf16 KV cache) runs there too: the call
widens the step's activations to fp32, computes in fp32, stores K/V rounded to bf16 and rounds the result back (eager
bf16 rounds after every op, so the two agree to bf16 precision, not bit for bit). :meth:`FusedDecoder.build` returns
None where a layer gives no description (SwiftKV adapters, an activation other than SiLU, a weight the kernels cannot
read).
"""

from __future__ import annotations

import ctypes
import math
import sys
from dataclasses import dataclass

import torch

from swiftkv.config import SwiftKVConfig
from swiftkv.kernels import elementwise
from swiftkv.kernels import fused_decode as kernels
from swiftkv.kernels import linear as linear_kernels
from swiftkv.kernels.elementwise import as_fp32
from swiftkv.kernels.linear import GEMM_MAX_ROWS, GEMV_ROWS, CWeight
from swiftkv.kernels.switches import KernelSwitches
from swiftkv.layers.linear import Linear, amx_takes_batch

# Rows x weights of one layer from which a decode step on bf16 weights leaves the fused call for the eager layers and
# oneDNN's AMX tiles (amx_takes_batch): the tiles must win back the eager layers' overhead, ~1.2-2.5 ms a layer
# (measured on Zen 4, the same kernels: 1B shape 308 vs 268 ms a batch-32 step, default model ~35 ms of 84), and save
# ~3e-12 s per row and weight (AVX512-BF16 dot products ~0.32 TFLOP/s, oneDNN 0.60 on the tiles at 32 rows). So the
# 1B shape from 9 rows, an 8B model from 5, a 135M one never. An estimate from those rates, unmeasured on AMX; only
# where the kernels' own AMX GEMM cannot run (kernels.linear.amx_available), since it keeps such steps fused.
AMX_EAGER_MIN_WORK = 5e8


@dataclass
class DecodeLayerSpec:
    """What a decoder layer gives the fused decode: its norms and its prepared projections."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    q: Linear | None  # the original q/k/v (None where a SwiftKV checkpoint lacks them)
    k: Linear | None
    v: Linear | None
    q_swiftkv: Linear | None  # SwiftKV layers only
    o: Linear
    gate: Linear
    up: Linear
    down: Linear


@dataclass
class StoreKVSpec:
    """SingleInputKV's store: ``norm_swiftkv`` and each group leader's K and V projections, with its owner."""

    norm: torch.Tensor
    eps: float
    kv: list[tuple[Linear, Linear]]
    owners: list[int]


@dataclass
class FusedDecodeSpec:
    """A model for the fused decode: (hidden, heads, KV heads, head dim, intermediate), each layer's description
    (None where a layer cannot run there), SingleInputKV's store (None: not a SwiftKV model), the checkpoint's
    layout."""

    dims: tuple[int, int, int, int, int]
    layers: list[DecodeLayerSpec | None]
    store: StoreKVSpec | None
    skv: SwiftKVConfig


def _c_weight(lin: Linear | None, alive: list) -> CWeight | None:
    """The C view of a prepared projection (with an fp32 copy of its bias, kept in ``alive``), or None where the
    kernels cannot read it."""
    held = None if lin is None else lin.held
    if held is None or held.kind not in ("q4", "q8", "bf16", "f32"):
        return None
    bias = None if lin.bias is None else lin.bias.detach().float().contiguous()
    alive.append(bias)
    return held.c_weight(bias)


class FusedDecoder:
    """The decoder layers as C descriptors (built once; the weights must not change after)."""

    def __init__(self, dims: tuple[int, int, int, int, int], specs: list[DecodeLayerSpec],
                 store: StoreKVSpec | None, switches: KernelSwitches) -> None:
        self.dims = dims  # hidden, heads, kv heads, head dim, intermediate
        self.specs = specs
        # what a bf16 model's matmuls may use on this CPU (csrc/skv_linear.h)
        self.bf16_dots = (linear_kernels.DOT_BF16 * (switches.bf16_dot and linear_kernels.bf16_dot_available())
                          | linear_kernels.DOT_I8 * (switches.int8_dot and linear_kernels.int8_dot_available())
                          | linear_kernels.DOT_AMX * (switches.bf16_dot and linear_kernels.amx_available()))
        self.ew512 = kernels.STEP_EW512 * elementwise.avx512_available()  # any model: the elementwise ops' AVX-512 form
        self.eps = specs[0].eps
        self.dtype = specs[0].input_norm.dtype  # the model's compute dtype
        # the fewest rows of a step that oneDNN's AMX tiles may take from the fused call (bf16-held weights only)
        hidden, heads, kv_heads, d, inter = dims
        layer_weights = 2 * hidden * heads * d + 2 * hidden * kv_heads * d + 3 * hidden * inter  # q, o, k, v, MLP
        dense_bf16 = all(lin.held is not None and lin.held.kind == "bf16"
                         for s in specs for lin in (s.q, s.o, s.gate, s.up, s.down))
        self._amx_rows = (max(GEMV_ROWS + 1, math.ceil(AMX_EAGER_MIN_WORK / layer_weights)) if dense_bf16
                          else GEMM_MAX_ROWS + 1)
        if self._amx_rows <= GEMM_MAX_ROWS and amx_takes_batch(self._amx_rows, self.dtype):
            print(f"swiftkv: decode steps of {self._amx_rows}+ sequences: oneDNN's bf16 matmuls on the AMX tiles "
                  "(SWIFTKV_AMX_DECODE=0: the fused AVX512-BF16 kernels)", file=sys.stderr)
        self._norms = [(as_fp32(s.input_norm), as_fp32(s.post_norm)) for s in specs]  # (a bf16 model's: widened)
        self._arrays: dict[tuple, ctypes.Array | None] = {}
        # every tensor a descriptor points into: kept alive here, so a later change to the model (against
        # the rule above) leaves stale values, never dangling pointers
        self._alive: list = [specs, self._norms]
        self._store = self._store_kv(store)

    @classmethod
    def build(cls, spec: FusedDecodeSpec, switches: KernelSwitches) -> FusedDecoder | None:
        """A decoder for the model ``spec`` describes (from the layers themselves), or None where it does not
        apply (switched off, a layer it cannot run, kernels not built)."""
        dims, specs, skv = spec.dims, spec.layers, spec.skv
        if (not switches.fused_decode or kernels.library() is None or not specs or any(s is None for s in specs)
                or not switches.paged_attention):
            return None
        hidden, _, _, d, inter = dims
        if hidden % 8 or d % 16 or inter % 8:
            return None
        norms = [n for s in specs for n in (s.input_norm, s.post_norm)]
        if any(n.device.type != "cpu" for n in norms) or any(s.eps != specs[0].eps for s in specs):
            return None
        decoder = cls(dims, specs, spec.store, switches)
        return decoder if decoder._layers(skv, True) is not None else None

    def _layers(self, skv: SwiftKVConfig, swiftkv: bool) -> ctypes.Array | None:
        """Every layer's descriptor for layout ``skv`` (SwiftKV layers on their SingleInputKV path when
        ``swiftkv``), or None if a projection it needs has no C view."""
        key = (skv.num_layers, skv.num_key_value_layers, skv.key_value_group_size, swiftkv)
        if key not in self._arrays:
            descs = []
            for i, (s, (input_norm, post_norm)) in enumerate(zip(self.specs, self._norms)):
                swift = swiftkv and skv.is_swiftkv_layer(i)
                q, k, v = (s.q_swiftkv, None, None) if swift else (s.q, s.k, s.v)
                ws = [_c_weight(lin, self._alive) for lin in (q, s.o, s.gate, s.up, s.down)]
                kv = [CWeight(), CWeight()] if swift else [_c_weight(k, self._alive), _c_weight(v, self._alive)]
                if any(w is None for w in ws + kv):
                    descs = None
                    break
                descs.append(kernels.CLayer(input_norm.data_ptr(), post_norm.data_ptr(), ws[0], *kv, *ws[1:],
                                            skv.kv_owner(i), int(swift)))
            self._arrays[key] = None if descs is None else (kernels.CLayer * len(descs))(*descs)
        return self._arrays[key]

    def takes(self, meta, num_rows: int) -> bool:
        """Whether a step is one the fused calls take: one query per sequence over the paged cache, at most
        ``GEMM_MAX_ROWS`` rows and not a batch oneDNN's AMX tiles take on bf16 weights (``AMX_EAGER_MIN_WORK``,
        :func:`~swiftkv.layers.linear.amx_takes_batch`), no gradient wanted (the cache itself was checked once, by
        :meth:`runs`)."""
        return (meta.paged and meta.is_decode and 1 <= num_rows <= GEMM_MAX_ROWS and not torch.is_grad_enabled()
                and not (num_rows >= self._amx_rows and amx_takes_batch(num_rows, self.dtype)))

    def run_layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta, attn, start: int, end: int,
                   swiftkv: bool = False, skv: SwiftKVConfig | None = None) -> torch.Tensor:
        """Layers ``start..end-1`` of layout ``skv`` on ``h [M, hidden]`` (a step :meth:`takes`), over ``attn``'s
        paged cache (:class:`~swiftkv.layers.paged_attention.PagedAttention`)."""
        layers = self._layers(skv, swiftkv)
        if layers is None:
            raise ValueError("this layout has a projection the fused decode cannot read (the runner checks this)")
        stores = any(not (swiftkv and skv.is_swiftkv_layer(i)) for i in range(start, end))
        h32 = h.to(torch.float32, copy=True).contiguous()  # updated in place
        step, _keep = self._step(h32, cos, sin, meta, attn.kv_cache, stores, self._layers_scratch(h.shape[0]))
        kernels.run_layers(layers, start, end, step)
        return h32.to(h.dtype)

    def run_all_layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta, attn,
                       skv: SwiftKVConfig) -> torch.Tensor:
        """Every layer of layout ``skv`` on ``h`` (no token dropped on the way), SingleInputKV's store between
        layers l-1 and l: one call, one parallel region (a SwiftKV step was three, each with its own setup)."""
        l, L = skv.num_key_value_layers, skv.num_layers
        if l == L:
            return self.run_layers(h, cos, sin, meta, attn, 0, L, swiftkv=True, skv=skv)
        layers = self._layers(skv, True)
        if layers is None or self._store is None:
            raise ValueError("this layout has a projection the fused decode cannot read (the runner checks this)")
        h32 = h.to(torch.float32, copy=True).contiguous()  # updated in place
        m = h.shape[0]
        step, _keep = self._step(h32, cos, sin, meta, attn.kv_cache, True,
                                 max(self._layers_scratch(m), self._store_scratch(m)))
        kernels.run_swiftkv(layers, l, self._store, step)
        return h32.to(h.dtype)

    def store_swiftkv(self, h_l: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta, attn) -> None:
        """SingleInputKV's K/V of every later KV owner from ``h_l [M, hidden]`` into the paged cache (the
        model's ``store_swiftkv`` in one call)."""
        h_l = as_fp32(h_l)
        step, _keep = self._step(h_l, cos, sin, meta, attn.kv_cache, True, self._store_scratch(h_l.shape[0]))
        kernels.store_kv(self._store, step)

    def runs(self, skv: SwiftKVConfig, kv_cache: torch.Tensor) -> bool:
        """Whether it runs layout ``skv`` over ``kv_cache``: a contiguous fp32 or bf16 CPU cache, every layer (its SwiftKV
        layers on their SingleInputKV path: the key the model's forward runs with) and, for a SwiftKV layout,
        SingleInputKV's store with a C view."""
        cache_ok = (kv_cache.dtype in (torch.float32, torch.bfloat16) and kv_cache.device.type == "cpu"
                    and kv_cache.is_contiguous())
        return cache_ok and self._layers(skv, True) is not None and (self._store is not None or skv.is_baseline)

    def _store_kv(self, spec: StoreKVSpec | None) -> kernels.CStoreKV | None:
        """The SingleInputKV store's descriptor (None: not a SwiftKV model, or a weight without a C view)."""
        if spec is None or spec.eps != self.eps:
            return None
        ws = [_c_weight(lin, self._alive) for pair in spec.kv for lin in pair]
        if any(w is None for w in ws):
            return None
        kv, owners, norm = (CWeight * len(ws))(*ws), torch.tensor(spec.owners), as_fp32(spec.norm)
        self._alive += [spec, kv, owners, norm]
        return kernels.CStoreKV(norm.data_ptr(), kv, owners.data_ptr(), len(spec.owners))

    def _layers_scratch(self, m: int) -> int:
        """Floats of scratch the layers' call needs for ``m`` rows."""
        return kernels.layers_scratch_floats(m, *self.dims)

    def _store_scratch(self, m: int) -> int:
        """Floats of scratch SingleInputKV's store needs for ``m`` rows (its K and V rows of every leader)."""
        return kernels.store_kv_scratch_floats(m, self.dims[0], 2 * self._store.n * self.dims[2] * self.dims[3])

    def _step(self, h, cos, sin, meta, cache: torch.Tensor, stores: bool,
              scratch_floats: int) -> tuple[kernels.CStep, list]:
        """The C view of this step (with ``scratch_floats`` of scratch), and the tensors it points into (to keep
        alive during the call)."""
        hidden, heads, kv_heads, d, inter = self.dims
        scratch = torch.empty(scratch_floats)
        cos, sin, kv_lens = as_fp32(cos), as_fp32(sin), meta.kv_lens_t
        tables = meta.block_tables.contiguous()
        slots = meta.slot_mapping.contiguous() if stores else None
        step = kernels.CStep(h.shape[0], hidden, heads, kv_heads, d, inter, self.eps, h.data_ptr(), cos.data_ptr(),
                             sin.data_ptr(), cache.data_ptr(), cache.shape[3], cache.shape[4], tables.shape[1],
                             int(cache.dtype == torch.bfloat16), None if slots is None else slots.data_ptr(),
                             tables.data_ptr(), kv_lens.data_ptr(), scratch.data_ptr(), GEMV_ROWS,
                             # a bf16 model (its cache is bf16; h is widened to fp32 for the call): its matmuls
                             (self.bf16_dots if cache.dtype == torch.bfloat16 else 0) | self.ew512,
                             torch.get_num_threads())
        return step, [cos, sin, kv_lens, tables, slots, scratch]
