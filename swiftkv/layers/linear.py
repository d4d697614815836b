"""Inference-time linear layers: frozen weights, oneDNN-prepacked on CPU.

What inductor's freezing (and vLLM's CPU backend) does for a linear layer: reorder the weight once
into oneDNN's blocked layout and call oneDNN's matmul on it. On a 2-core AVX2 machine that made
the skinny matmuls of decode 1.3-2.4x faster than ``F.linear`` (the LM head at batch 32 53 -> 22 ms).
Only used where PyTorch has oneDNN and the dtype has a native kernel (float32 everywhere, bf16
where the CPU multiplies bf16 natively); ``F.linear`` otherwise. The module's own parameters stay
as they are (the packed copy is extra memory, one more copy of the projection weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from swiftkv.layers import compact_weights


def can_pack(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can use oneDNN's prepacked matmul here."""
    from swiftkv.platforms import cpu_has_native_bf16

    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and cpu_has_native_bf16())


class InferenceLinear:
    """``y = x W^T + b`` for a frozen ``W`` (not an ``nn.Module``: it adds nothing to a state dict).

    Where ``W`` has an exact compact form (:mod:`swiftkv.layers.compact_weights`: weights that came
    from GGUF Q4_1/Q8_0, or bf16 values), batches of up to ``GEMM_MAX_ROWS`` rows read that instead.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool | None = None) -> None:
        weight = weight.detach().contiguous()
        self.bias = None if bias is None else bias.detach()
        self.out_features = weight.shape[0]
        self.compact = compact_weights.to_compact(weight) if compact_weights.enabled() else None
        self.packed = _packed(weight) if (can_pack(weight) if pack is None else pack) else None
        self.weight = weight if self.packed is None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compact is not None and x.dtype == torch.float32 and x.numel():
            y = compact_weights.matmul(x.reshape(-1, x.shape[-1]), self.compact, self.bias)
            if y is not None:
                return y.view(*x.shape[:-1], self.out_features)
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


def _packed(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked layout (tuned for batch 64; it serves every batch size), or None where
    oneDNN refuses this dtype on this CPU (the flags can promise more than its kernels support)."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 64)
    except RuntimeError:
        return None


def route_through_inference_linear(module: nn.Linear, pack: bool | None = None) -> None:
    """Make ``module(x)`` use an :class:`InferenceLinear` of its current weight (inference only: a
    later change of the weight is not seen)."""
    module.forward = InferenceLinear(module.weight, module.bias, pack)


def fuse_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate Linear weights (and biases) into one tensor whose slices become the params."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = None if linears[0].bias is None else torch.cat([lin.bias.detach() for lin in linears])
    start = 0
    for lin in linears:
        n = lin.out_features
        lin.weight = nn.Parameter(weight[start : start + n], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[start : start + n], requires_grad=False)
        start += n
    return weight, bias
