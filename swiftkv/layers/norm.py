"""RMSNorm with the same numerics as transformers' LlamaRMSNorm (fp32 statistics)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from swiftkv.kernels import elementwise as cpu_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (y := cpu_ops.rms_norm(x, self.weight, self.eps)) is not None:  # inference on CPU: one pass
            return y
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one op (decode runs it 61 times a step)
            return F.rms_norm(x, x.shape[-1:], self.weight, eps=self.eps)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)
