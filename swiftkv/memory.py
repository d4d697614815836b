"""The process's memory as the OS sees it (Linux; elsewhere these say nothing and change nothing): what is
available, what a model will need, and page-level advice for large buffers."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

_MADV_DONTNEED, _MADV_NOHUGEPAGE = 4, 15


def available_bytes() -> int | None:
    """Memory a new allocation can get now: ``MemAvailable``, or the cgroup's remaining limit if lower;
    None where unknown."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:  # cgroup v2: a container's limit
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, int(limit) - used) if avail is not None else int(limit) - used
    except (OSError, ValueError):
        pass
    return avail


def rss_bytes() -> int | None:
    """This process's resident set size (None where unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _madvise(start: int, length: int, advice: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise(start, length, advice) == 0
    except (OSError, AttributeError):
        return False


def _page_range(t) -> tuple[int, int]:
    """The whole pages inside a tensor's bytes."""
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    return -(-start // page) * page, end // page * page


def no_huge_pages(t) -> None:
    """Ask for small pages on a large, lazily filled buffer (the KV cache): NumPy asks for transparent huge
    pages on large allocations, and then the first write into each of the cache's per-head regions would
    make 2 MB resident, hundreds of MB before a few blocks are used."""
    lo, hi = _page_range(t)
    if hi > lo:
        _madvise(lo, hi - lo, _MADV_NOHUGEPAGE)


def release_pages(t) -> int:
    """Drop the resident pages that lie wholly inside a tensor backed by a *file* mapping (``MADV_DONTNEED``:
    the file's bytes are read again if touched). Anonymous memory is never touched: its pages would read
    back as zeros. Returns the bytes released (0 where nothing applied)."""
    lo, hi = _page_range(t)
    if hi <= lo or not _in_file_mapping(lo, hi):
        return 0
    return hi - lo if _madvise(lo, hi - lo, _MADV_DONTNEED) else 0


def _in_file_mapping(lo: int, hi: int) -> bool:
    """Whether ``[lo, hi)`` lies inside one private mapping of a regular file (``/proc/self/maps``)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        a, b = (int(x, 16) for x in fields[0].split("-"))
        if a <= lo and hi <= b:
            return len(fields) >= 6 and fields[5].startswith("/") and fields[1][3] == "p" and fields[4] != "0"
    return False
