"""Device and dtype choice: what is fastest on this machine, decided in one place.

``dtype="auto"`` (the default of every entry point) means: on CUDA, bf16 where the GPU supports
it; on CPU, bf16 only where the CPU multiplies bf16 natively (AVX512_BF16 or AMX-BF16), float32
otherwise. Without those instructions PyTorch emulates bf16 matmuls and a bf16 prefill runs ~3.6x
slower than float32. The choice is said once per process on stderr. An explicit dtype always wins.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_said: set[str] = set()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty where unavailable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | set[str] | None = None) -> bool:
    """True where bf16 matmuls have a hardware fast path (AVX512_BF16 or AMX-BF16)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def auto_dtype(device: str | torch.device = "cpu", flags: frozenset[str] | set[str] | None = None) -> torch.dtype:
    """The fastest compute dtype for ``device`` (``flags`` overrides the CPU's, for tests)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16(flags) else torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu",
                  flags: frozenset[str] | set[str] | None = None, say: bool = True) -> torch.dtype:
    """``"auto"``/``None`` -> :func:`auto_dtype` (said once on stderr); a name -> that dtype.

    Raises ``ValueError`` for unknown names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        chosen = auto_dtype(device, flags)
        if say:
            _say_once(device, chosen, flags)
        return chosen
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of: auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _say_once(device, chosen: torch.dtype, flags) -> None:
    dev = torch.device(device)
    key = f"{dev.type}:{chosen}"
    if key in _said:
        return
    _said.add(key)
    if dev.type == "cpu":
        why = ("the CPU has native bf16 (" + ", ".join(f for f in NATIVE_BF16_FLAGS if f in (flags or cpu_flags())) + ")"
               if chosen == torch.bfloat16 else "the CPU has no native bf16 matmul (no avx512_bf16/amx_bf16)")
    else:
        why = f"{dev.type} device"
    print(f"swiftkv: dtype auto -> {dtype_name(chosen)} ({why}; pass --dtype to override)", file=sys.stderr)


def resolve_device(device: str | None) -> torch.device:
    """``"auto"``/``None`` -> CUDA when a GPU is visible, else CPU; ``"cuda"`` without one is a
    ``ValueError``. Under torchrun each process takes GPU ``LOCAL_RANK``."""
    import os

    name = device or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this PyTorch sees no CUDA GPU (torch {torch.__version__}); "
                             "use --device cpu, or install a CUDA build of torch on a GPU machine")
        if name == "cuda":
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    elif name != "cpu":
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(name)


def release_openmp_threads() -> bool:
    """Free the calling thread's OpenMP worker threads (libgomp's ``omp_pause_resource_all``); True if done.

    Call it from a thread that is done with parallel work (the server's main thread, once the model is
    loaded) before another thread (the engine's) runs the model. libgomp counts every worker thread in the
    process; once they outnumber the CPUs it stops spinning between parallel regions and puts workers to
    sleep after each one, so a model stepped from a second thread ran 1.4-1.9x slower per op on 2 cores
    (oneDNN linear 173 -> 253 us, decode attention 39 -> 88 us). A thread that runs parallel work again
    gets a new pool. False where PyTorch's OpenMP is not libgomp or is too old to pause (nothing changes).
    """
    import ctypes

    for path in _loaded_libgomp():
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.restype, pause.argtypes = ctypes.c_int, [ctypes.c_int]
        return pause(1) == 0  # omp_pause_soft
    return False


def _loaded_libgomp() -> list[str]:
    """Paths of the libgomp libraries mapped into this process (Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    return list(dict.fromkeys(line.split()[-1] for line in maps.splitlines() if "libgomp" in line.rsplit("/", 1)[-1]))
