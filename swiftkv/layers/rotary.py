"""Rotary position embedding for flat token layouts.

The inverse frequencies (including ``llama3``, ``linear``, ``yarn`` scaling) come from
transformers' own RoPE initialisation, so every scaling type it supports matches it exactly.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from swiftkv.kernels import elementwise as cpu_ops


class RotaryEmbedding(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type in ("dynamic", "longrope"):
            raise ValueError(
                f"RoPE type {rope_type!r} depends on the sequence length and is not supported; "
                "supported: default, linear, llama3, yarn."
            )
        with torch.device("cpu"):  # real values even when the model is built on "meta"
            hf_rope = LlamaRotaryEmbedding(config)
        # kept out of the module's tensors: model.to(bfloat16) / to_empty() must not touch it
        self._inv_freq_values = hf_rope.inv_freq.float().tolist()
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self.scaling = float(hf_rope.attention_scaling)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] -> (cos, sin), each [N, head_dim] in ``dtype``."""
        inv_freq = self._inv_freq.get(positions.device)
        if inv_freq is None:
            inv_freq = torch.tensor(self._inv_freq_values, dtype=torch.float32, device=positions.device)
            self._inv_freq[positions.device] = inv_freq
        freqs = positions.float()[:, None] * inv_freq[None, :]  # [N, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [N, D]
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D]; cos/sin [N, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rotary`, in place where the CPU kernel takes it (inference, fp32): only for an
    ``x`` nobody else reads afterwards, e.g. a fresh projection's output. Returns the rotated x."""
    out = cpu_ops.rotary_inplace(x, cos, sin)
    return out if out is not None else apply_rotary(x, cos, sin)
