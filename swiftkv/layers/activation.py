"""The gated MLP's activation: ``act(gate) * up`` (vLLM's ``SiluAndMul``), one pass on the CPU where it runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from swiftkv.kernels import elementwise as cpu_ops


class ActAndMul(nn.Module):
    """``act(gate) * up`` for a transformers ``hidden_act`` name; SiLU runs the one-pass CPU kernel at inference."""

    def __init__(self, hidden_act: str) -> None:
        super().__init__()
        self.is_silu = hidden_act == "silu"
        self.act = F.silu if self.is_silu else ACT2FN[hidden_act]

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.is_silu and (out := cpu_ops.silu_and_mul(gate, up)) is not None:  # inference on CPU: one pass
            return out
        return self.act(gate) * up
