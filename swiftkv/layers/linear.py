"""Linear and embedding layers that own their weight in its held form (vLLM's ``LinearMethodBase`` /
``quant_method.apply`` pattern).

Before :meth:`Linear.prepare` a :class:`Linear` is an ``nn.Linear`` (training, the transformers wrapper,
reference paths). ``prepare(dtype)`` -- called once, when a model is loaded for inference -- replaces the
weight parameter by a :class:`~swiftkv.layers.weights.HeldWeight` (the checkpoint's bytes, memory-mapped
where they are already the held form) and a :class:`HeldLinearMethod` that applies it:

- decode-sized batches (up to ``GEMM_MAX_ROWS`` rows) run the C kernels on the held bytes (widened in
  registers; on a CPU with AMX, bf16 batches above ``GEMV_ROWS`` rows on the kernels' AMX tiles, every held kind:
  ``csrc/skv_gemm_amx.c``). Without those tiles, on a CPU with native bf16, bf16 batches above ``GEMV_ROWS``
  rows of bf16 weights go to oneDNN's bf16 GEMM instead (faster there than the AVX2 panel kernel) but for the
  AVX512-BF16 panel's range, and on a CPU with AMX whose tiles the kernels cannot use, every such batch goes to
  oneDNN (:func:`amx_takes_batch`);
- prefill-sized batches widen the weight (in row chunks of at most ``WIDEN_CHUNK_BYTES``) into a reused
  buffer in the compute dtype and call oneDNN's matmul on it (PyTorch's ``mkldnn`` linear, which takes
  a plain weight at ~97% of its prepacked speed): one pass over the bytes per thousands of FLOPs per
  weight. Weights already in the compute dtype are used as they are. In bf16 a gated MLP's SiLU and product ride
  in the gate and up matmuls' epilogues there (:func:`gated_silu`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from swiftkv import platforms
from swiftkv.kernels import linear as kernels
from swiftkv.layers.weights import HeldWeight, hold

WIDEN_CHUNK_BYTES = 64 << 20
# bf16 weights, bf16 batches: the AVX512-BF16 panel GEMM beats oneDNN's bf16 GEMM up to this many rows on a CPU
# without AMX (Zen 4, 2 threads: 1.7x at 8 rows, 1.04-1.26x at 32, 0.83-1.11x at 64)
DOT_OVER_ONEDNN_MAX_ROWS = 32
# platforms.cpu_flags() is looked up at each call below, never imported by name: tests stand in other CPUs' flags
_widen_buffers: dict[torch.dtype, torch.Tensor] = {}  # reused across layers and steps (no page faults)


def _onednn_available(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and platforms.cpu_has_native_bf16())


def dense_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu: bool = False,
                 mul: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T + bias`` for a plain weight in ``x``'s dtype, then ``silu`` of it, or times ``mul`` (same
    shape as the result): oneDNN where it has a kernel for the dtype on this CPU (no gradient wanted; the activation
    and the product in its epilogue, on the fp32 sums), else ``F.linear`` and PyTorch's ops."""
    if x.device.type == "cpu" and not torch.is_grad_enabled() and _onednn_available(x.dtype):
        x2 = x.reshape(-1, x.shape[-1])  # [M, I]
        if mul is not None:
            y = torch.ops.mkldnn._linear_pointwise.binary(x2, mul.reshape(x2.shape[0], -1).contiguous(), weight, bias,
                                                         "mul")
        else:
            y = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "swish" if silu else "none", [], "")
        return y.view(*x.shape[:-1], weight.shape[0])
    y = F.linear(x, weight, bias)
    return F.silu(y) if silu else y if mul is None else y * mul


def gated_silu(gate: Linear, up: Linear, x: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate(x)) * up(x)`` as two oneDNN matmuls whose epilogues apply the SiLU and the product (no pass of
    its own over the [tokens, intermediate] activations, no gate-and-up intermediate): bf16 prefill-sized batches on
    a CPU where oneDNN multiplies bf16, both layers prepared (Zen 4, alternated pairs: 1.00x / 1.02x / 1.03x the
    separate pass at 512 / 2,048 tokens / 32 x 64 tokens; in fp32, AVX2-capped, 0.96x: not used there). None
    elsewhere (then the caller runs its activation; decode-sized batches take the kernels)."""
    g, u = gate.method, up.method
    if (g is None or u is None or torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.bfloat16
            or not _onednn_available(x.dtype)):
        return None
    x2 = x.reshape(-1, x.shape[-1])  # [M, H]
    if g._kernels_take(x2) or u._kernels_take(x2):
        return None
    act = g.apply_dense(x2, gate.bias, silu=True)  # [M, I]
    return u.apply_dense(x2, up.bias, mul=act).view(*x.shape[:-1], u.held.out_features)


class HeldLinearMethod:
    """Applies a :class:`~swiftkv.layers.weights.HeldWeight` (see the module docstring for the paths)."""

    def __init__(self, held: HeldWeight, bias: torch.Tensor | None) -> None:
        self.held = held
        self._c = held.c_weight() if kernels.library() is not None and held.kind in kernels.KINDS else None

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        held, shape = self.held, x.shape
        x2 = x.reshape(-1, shape[-1])  # [M, I]
        if not self._kernels_take(x2):
            y = self.apply_dense(x2, bias)
        else:
            if x2.shape[0] > kernels.GEMV_ROWS and self._int8_dot(x2):
                y = kernels.linear_int8(x2, self._c)  # in x's dtype, without fp32 copies around it
            else:
                y = kernels.linear(x2.float(), self._c, bf16_dot=self._bf16_dot(x2), int8_dot=self._int8_dot(x2),
                                   amx=self._bf16_dot(x2) and kernels.amx_available()).to(x.dtype)
            if bias is not None:
                y += bias
        return y.view(*shape[:-1], held.out_features)

    def apply_dense(self, x: torch.Tensor, bias: torch.Tensor | None, silu: bool = False,
                    mul: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, I] through the weight in ``x``'s dtype (read in place, or widened) and oneDNN, with
        :func:`dense_matmul`'s epilogue: the path of batches the kernels do not take."""
        held = self.held
        if held.is_dense and held.data.dtype == x.dtype:
            return dense_matmul(x, held.data, bias, silu, mul)
        return self._widened_matmul(x, bias, silu, mul)

    def _kernels_take(self, x: torch.Tensor) -> bool:
        """Decode-sized batches with no gradient wanted, except bf16 GEMM-sized ones on bf16 weights where the
        CPU multiplies bf16 natively: oneDNN takes those, but for the AVX512-BF16 panel GEMM's range without AMX
        (``DOT_OVER_ONEDNN_MAX_ROWS``; with AMX oneDNN's tiles are the faster path: :func:`amx_takes_batch`).
        Batches of any size where the int8 dot products are opted in (:meth:`_int8_dot`) on a CPU without AMX (Zen 4,
        2 threads, the default model's shapes: 1.4-2.1x widening + oneDNN's bf16 matmul at 512-2,048 rows)."""
        m = x.shape[0]
        if self._c is None or m < 1 or x.requires_grad:
            return False
        if m > kernels.GEMM_MAX_ROWS:  # prompts: the int8 GEMM where opted in and no AMX tiles (oneDNN's are faster)
            return self._int8_dot(x) and "amx_bf16" not in platforms.cpu_flags()
        if not (self.held.kind == "bf16" and m > kernels.GEMV_ROWS and _onednn_bf16(x)):
            return True
        if self._bf16_dot(x) and kernels.amx_available():  # the kernels' own AMX tiles: no eager oneDNN call
            return True
        return self._bf16_dot(x) and m <= DOT_OVER_ONEDNN_MAX_ROWS and not amx_takes_batch(m, x.dtype)

    @staticmethod
    def _bf16_dot(x: torch.Tensor) -> bool:
        """A bf16 batch on a CPU with AVX512-BF16: the panel GEMM's dot-product form (above ``GEMV_ROWS`` rows;
        from 1 row for a bf16-held weight, where it beats the gemv: the kernel decides)."""
        return x.dtype == torch.bfloat16 and kernels.bf16_dot_available()

    def _int8_dot(self, x: torch.Tensor) -> bool:
        """A bf16 batch on a Q4/Q8-held weight on a CPU with AVX512-VNNI, opted in: int8 activations per block."""
        return x.dtype == torch.bfloat16 and self.held.kind in ("q4", "q8") and kernels.int8_dot_available()

    def _widened_matmul(self, x: torch.Tensor, bias: torch.Tensor | None, silu: bool = False,
                        mul: torch.Tensor | None = None) -> torch.Tensor:
        """Prefill-sized batches: the weight widened to ``x``'s dtype (row chunks), then oneDNN."""
        held, dt = self.held, x.dtype
        if self._c is None or dt not in (torch.float32, torch.bfloat16) or torch.is_grad_enabled():
            return dense_matmul(x, held.dense().to(dt), bias, silu, mul)  # a fresh weight: autograd may keep it
        rows = max(1, min(held.out_features, WIDEN_CHUNK_BYTES // (held.in_features * x.element_size())))
        buf = _widen_buffer(dt, rows * held.in_features).view(rows, held.in_features)
        if rows == held.out_features:
            return dense_matmul(x, kernels.widen(self._c, 0, rows, buf), bias, silu, mul)
        y = torch.empty(x.shape[0], held.out_features, dtype=dt)
        for start in range(0, held.out_features, rows):
            n = min(rows, held.out_features - start)
            cols = slice(start, start + n)
            y[:, cols] = dense_matmul(x, kernels.widen(self._c, start, n, buf[:n]),
                                      bias[cols] if bias is not None else None, silu,
                                      mul[:, cols] if mul is not None else None)
        return y


def amx_takes_batch(m: int, dtype: torch.dtype) -> bool:
    """Whether a batch of ``m`` rows in ``dtype`` on a bf16-held weight goes to oneDNN's bf16 matmul on the AMX
    tiles rather than the kernels -- only where the kernels' own AMX GEMM cannot run
    (:func:`~swiftkv.kernels.linear.amx_available`: Linux refused the tiles, an old compiler; where it runs, every
    held kind's decode batches stay in the kernels, on the tiles): bf16 batches above ``GEMV_ROWS`` rows on a CPU
    with AMX-BF16 (there oneDNN
    reached 0.60 TFLOP/s at 32 rows with a plain weight on 2 cores of a Sapphire Rapids-class Xeon, past all
    that AVX512-BF16 dot products gave on 2 Zen 4 cores: ~0.39 TFLOP/s), unless ``SWIFTKV_AMX_DECODE=0``. A fused
    decoder over bf16 weights leaves such steps to the eager layers where its layers are big enough
    (:meth:`~swiftkv.layers.fused_decode.FusedDecoder.takes`). Q4/Q8 weights stay on the kernels: widening them per step and running the layers eagerly cost more than the
    tiles save (Zen 4, default model, batch 32, oneDNN's AVX512-BF16 matmuls in place of the tiles: 84 vs 47 ms
    a step, of which the matmuls ~40 and the widening ~9)."""
    from swiftkv.kernels.switches import switched_on

    return (m > kernels.GEMV_ROWS and dtype == torch.bfloat16 and "amx_bf16" in platforms.cpu_flags()
            and switched_on("SWIFTKV_AMX_DECODE") and _onednn_available(torch.bfloat16)
            and not kernels.amx_available())


def _onednn_bf16(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and _onednn_available(torch.bfloat16)


def _widen_buffer(dtype: torch.dtype, numel: int) -> torch.Tensor:
    buf = _widen_buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = _widen_buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


class Linear(nn.Linear):
    """``nn.Linear`` until :meth:`prepare`; then its weight is held in its stored form and applied by
    ``self.method`` (the parameter ``weight`` is gone: one copy of every weight)."""

    method: HeldLinearMethod | None = None

    def prepare(self, dtype: torch.dtype, held: HeldWeight | None = None) -> None:
        """Hold the weight for inference in ``dtype`` (``held``: an already held weight to share, e.g. a tied
        LM head). Idempotent; the weight must not change afterwards."""
        if self.method is not None:
            return
        held = held if held is not None else hold(self.weight, dtype)
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.detach().to(dtype), requires_grad=False)
        self.method = HeldLinearMethod(held, self.bias)
        self.weight = None  # the held form is the only copy

    @property
    def held(self) -> HeldWeight | None:
        return None if self.method is None else self.method.held

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method is None:
            return F.linear(x, self.weight, self.bias)
        return self.method.apply(x, self.bias)


class VocabEmbedding(nn.Embedding):
    """``nn.Embedding`` until :meth:`prepare`; then rows are read from the held weight (a tied LM head
    shares it)."""

    held: HeldWeight | None = None
    compute_dtype: torch.dtype | None = None

    def prepare(self, dtype: torch.dtype) -> None:
        if self.held is None:
            self.held, self.compute_dtype = hold(self.weight, dtype), dtype
            self.weight = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.held is None:
            return super().forward(ids)
        return self.held.rows(ids.reshape(-1)).to(self.compute_dtype).view(*ids.shape, self.held.in_features)


@torch.no_grad()
def hold_weights(root: nn.Module, embed: VocabEmbedding, lm_head: Linear, dtype: torch.dtype) -> None:
    """Prepare ``root`` for inference in ``dtype``: the embedding and every :class:`Linear` under it hold their
    weights once (a tied LM head shares the embedding's), the other parameters (norms, biases, adapters: small)
    move to ``dtype``, and ``root`` becomes inference-only."""
    tied = lm_head.weight is embed.weight
    embed.prepare(dtype)
    for module in root.modules():
        if isinstance(module, Linear) and module is not lm_head:
            module.prepare(dtype)
    lm_head.prepare(dtype, held=embed.held if tied else None)
    for p in root.parameters():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    root.eval().requires_grad_(False)
