"""Low-rank adapters (LoRA-style) that the SwiftKV path can add beside frozen modules (optional;
``swiftkv distill --adapter-rank``)."""

from __future__ import annotations

import torch
from torch import nn


class LowRankAdapter(nn.Module):
    """``x -> B(A(x))``, added beside a frozen module on the SwiftKV path only. ``B`` starts at zero,
    so a fresh adapter leaves the model unchanged (LoRA's initialisation)."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.a = nn.Linear(in_features, rank, bias=False)
        self.b = nn.Linear(rank, out_features, bias=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.a.weight, a=5**0.5)
        nn.init.zeros_(self.b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))
