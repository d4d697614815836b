"""Interleaved repetitions (A B C A B C ...) so a noisy machine affects every system alike; each timed run
starts on quiet CPUs, and a system that fails for good (a peer process that died or hung) is dropped, not
the whole benchmark."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


class SystemFailed(RuntimeError):
    """A system under test cannot go on (its process crashed, hung or left): the benchmark reports it, with the
    reason, and measures the others."""


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot (Linux ``/proc/stat``), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def wait_for_quiet_cpus(max_wait_s: float = 2.0, sample_s: float = 0.05, busy_below: float = 0.15) -> float:
    """Wait (at most ``max_wait_s``) until the CPUs read idle over a ``sample_s`` window, so a run does not start
    while the previous system's threads still spin (libiomp5 keeps its workers busy for ``KMP_BLOCKTIME``
    after every parallel region; a peer's front end may still be winding down). Returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < max_wait_s:
        a = _cpu_times()
        time.sleep(sample_s)
        b = _cpu_times()
        if a is None or b is None or b[1] == a[1] or (b[0] - a[0]) / (b[1] - a[1]) < busy_below:
            break
    return time.monotonic() - start


def interleave(runners: dict[str, Callable[[], T]], reps: int, desc: str, warmup: bool = True,
               failed: dict[str, str] | None = None) -> dict[str, list[T]]:
    """Run each system once to warm up (result dropped), then ``reps`` rounds of every system in turn, each run
    started on quiet CPUs (:func:`wait_for_quiet_cpus`; ``SWIFTKV_BENCH_QUIET_WAIT_S=0`` turns that off).
    A system whose run raises :class:`SystemFailed` is not run again and is left out of the result; its reason
    goes into ``failed`` (by name). A progress bar on stderr names the system running now."""
    results: dict[str, list[T]] = {name: [] for name in runners}
    failed = {} if failed is None else failed
    quiet_s = float(os.environ.get("SWIFTKV_BENCH_QUIET_WAIT_S", "2"))
    rounds = reps + (1 if warmup else 0)
    with tqdm(total=rounds * len(runners), desc=desc, unit="run", leave=False) as bar:
        for r in range(rounds):
            for name, fn in runners.items():
                bar.update(1)
                if name in failed:
                    continue
                bar.set_postfix_str(f"{name}{' (warm-up)' if warmup and r == 0 else ''}")
                if quiet_s > 0:
                    wait_for_quiet_cpus(quiet_s)
                try:
                    out = fn()
                except SystemFailed as e:
                    failed[name] = str(e)
                    tqdm.write(f"bench: {name} failed and is left out of the rest of the run: {e}")
                    continue
                if not (warmup and r == 0):
                    results[name].append(out)
    return {name: runs for name, runs in results.items() if name not in failed}
