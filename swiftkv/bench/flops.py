"""FLOP counts for prefill and decode (forward only; 2 FLOPs per multiply-add), a measured matmul peak and, on a
CPU with AMX, the nominal one.

Per token and layer: projections ``2 * (H*(Hq*D) + 2*H*(Hkv*D) + (Hq*D)*H + 3*H*I)``; attention
``4 * Hq * D * c`` for a query that sees ``c`` keys (QK^T and PV). LM head ``2 * H * V`` per token that
needs logits. In SwiftKV mode a prompt token that needs no logits runs layers ``0..l-1`` plus, per
AcrossKV group leader, the two SingleInputKV projections ``2 * 2*H*(Hkv*D)``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from swiftkv.config import SwiftKVConfig


def _dims(config) -> tuple[int, int, int, int, int, int]:
    h, hq, hkv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // hq
    return h, hq, hkv, d, config.intermediate_size, config.vocab_size


def layer_flops(config, context: int) -> float:
    """One token through one full decoder layer, attending ``context`` keys."""
    h, hq, hkv, d, i, _ = _dims(config)
    proj = h * hq * d + 2 * h * hkv * d + hq * d * h + 3 * h * i
    return 2.0 * proj + 4.0 * hq * d * context


def prefill_flops(config, skv: SwiftKVConfig, prompt_len: int, swiftkv: bool, cached: int = 0) -> float:
    """FLOPs to prefill one prompt of ``n`` tokens and produce the logits of its last token; the
    first ``cached`` tokens' K/V come from the prefix cache (not computed)."""
    h, hq, hkv, d, _, v = _dims(config)
    L, n = config.num_hidden_layers, prompt_len
    new = n - cached
    l = skv.num_key_value_layers if swiftkv else L
    kv_proj = 2.0 * 2 * h * hkv * d  # one token's K and V projections for one layer
    # token at position p attends p + 1 keys: summed over the computed positions cached..n-1
    total = l * (new * layer_flops(config, 0) + 4.0 * hq * d * (n * (n + 1) - cached * (cached + 1)) / 2)
    if swiftkv:
        total += new * len(skv.group_leaders) * kv_proj  # SingleInputKV K/V of every computed token
        total += (L - l) * (layer_flops(config, n) - kv_proj)  # the last token's later layers
    return total + 2.0 * h * v


def decode_flops(config, context: int) -> float:
    """FLOPs for one decode token at ``context`` keys (same in both modes up to the tiny K/V term)."""
    _, _, _, _, _, v = _dims(config)
    return config.num_hidden_layers * layer_flops(config, context) + 2.0 * config.hidden_size * v


def measure_matmul_peak(dtype: torch.dtype = torch.bfloat16, n: int = 1024, seconds: float = 1.0) -> float:
    """Achieved FLOP/s of a square matmul in this process, now (the MFU denominator)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2.0 * n**3 * reps / (time.perf_counter() - t0)


AMX_BF16_FLOP_PER_CYCLE = 1024  # per core: one 16 x 32 by 32 x 16 bf16 tile product (TDPBF16PS) every 16 cycles


def cpu_mhz(cpuinfo: str | None = None) -> float | None:
    """The clock ``/proc/cpuinfo`` reports for the first CPU (MHz), or None."""
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("cpu MHz"):
            return float(line.split(":", 1)[1])
    return None


def amx_peak_gflops(flags: frozenset[str], threads: int, mhz: float | None) -> float | None:
    """The AMX-BF16 peak of ``threads`` cores at ``mhz`` (1,024 FLOP/cycle/core), GFLOP/s; None without AMX or a
    clock. The reported clock is the base (or current) one: under turbo the true peak is higher."""
    if "amx_bf16" not in flags or not mhz:
        return None
    return AMX_BF16_FLOP_PER_CYCLE * threads * mhz / 1e3
