"""What every benchmark result records: threads, torch version, dtype, KV cache space, machine load."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

# Every engine in a benchmark gets this much KV cache (vLLM-CPU: VLLM_CPU_KVCACHE_SPACE): with less,
# one system admits fewer requests at once and the comparison measures memory, not speed.
# SWIFTKV_BENCH_KV_CACHE_GIB changes it for every system alike (large models: several systems must fit at once).
KV_CACHE_GIB = int(os.environ.get("SWIFTKV_BENCH_KV_CACHE_GIB", "4"))


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


def log_tail(path, n: int = 15) -> str:
    """The last ``n`` lines of a process's log file ("" if it cannot be read)."""
    from pathlib import Path

    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def reset_peak_memory() -> None:
    """Start this process's peak resident size (``VmHWM``) afresh (Linux: ``/proc/self/clear_refs``), so a peak
    covers the measurement and not one-time preparation (a peer's checkpoint, written shard by shard)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def tree_memory(pid: int, children: bool = True) -> dict[str, int]:
    """``{"rss", "peak"}`` bytes of process ``pid`` and (``children``) all its descendants (Linux ``/proc``; the
    peaks summed are an upper bound of the tree's peak). Zeros where unknown."""
    from pathlib import Path

    def status(p: int) -> dict[str, int]:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines() if ":" in line)
        except OSError:
            return {"rss": 0, "peak": 0}
        kb = (lambda k: int(fields.get(k, "0 kB").split()[0]) * 1024)
        return {"rss": kb("VmRSS"), "peak": kb("VmHWM")}

    def descendants(p: int) -> list[int]:
        out = []
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                out += [int(c) for c in task.read_text().split()]
            except OSError:
                pass
        return out

    total, todo = {"rss": 0, "peak": 0}, [pid]
    while todo:
        p = todo.pop()
        m = status(p)
        total = {k: total[k] + m[k] for k in total}
        todo += descendants(p) if children else []
    return total


def measure_bandwidth(nbytes: int = 1 << 30, reps: int = 3) -> float:
    """The machine's memory read bandwidth in bytes/s: the best of ``reps`` sums over an ``nbytes`` tensor
    (far larger than any cache), with every thread, as decode reads its weights."""
    import time

    t = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(reps + 1):  # the first pass faults the pages in
        start = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def measure_bandwidth_apart(threads: int, timeout_s: float = 120.0) -> float | None:
    """:func:`measure_bandwidth` with ``threads`` threads in a child process, so it can run next to the measurement
    it is a roofline for (a shared machine's bandwidth drifts 2x within minutes) without its 1 GiB tensor counting in
    this process's memory; None if the child fails."""
    code = (f"import torch; torch.set_num_threads({int(threads)}); "
            "from swiftkv.bench.env import measure_bandwidth; print(measure_bandwidth())")
    root = str(Path(__file__).resolve().parents[2])  # the directory swiftkv is imported from
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout_s,
                              check=True)
        return float(done.stdout.split()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
