"""What every benchmark result records: threads, torch version, dtype, machine load."""

from __future__ import annotations

import os
import platform
import sys

import torch


def environment(dtype: str) -> dict:
    load1, load5, _ = os.getloadavg()
    cpus = os.cpu_count() or 1
    return {
        "threads": torch.get_num_threads(),
        "cpus": cpus,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": dtype,
        "loadavg_1m": round(load1, 2),
        "loadavg_5m": round(load5, 2),
        "busy": load1 > cpus * 0.75,
    }


def warn_if_busy(env: dict) -> None:
    if env["busy"]:
        print(f"warning: machine is busy (load {env['loadavg_1m']} on {env['cpus']} CPUs); "
              "absolute numbers are unreliable, compare the ratios", file=sys.stderr)
