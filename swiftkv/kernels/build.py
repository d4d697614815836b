"""Builds ``csrc/*.c`` once into one shared library in the cache and loads it with ctypes.

Each ``.c`` is its own translation unit; the build is keyed by a hash of every source, header and flag,
so an edited kernel is rebuilt and an old build is never loaded. On load the layout of every struct
the bindings mirror (ctypes) is checked against the library's own ``skv_abi_layout``: a mismatch is an
error naming the struct, not silent memory corruption.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from swiftkv.fileio import atomic_write, cache_dir
from swiftkv.kernels.switches import switched_on
from swiftkv.platforms import cpu_flags

CSRC = Path(__file__).with_name("csrc")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC"]
REQUIRED_FLAGS = {"avx2", "fma", "f16c"}

# name -> (restype, argtypes) of an exported function
Signatures = dict[str, tuple[type | None, list[type]]]
_LIB: list[ctypes.CDLL | None] = []  # [] until the first load()
_TYPED: set[str] = set()


def load(functions: Signatures | None = None) -> ctypes.CDLL | None:
    """The kernel library with ``functions`` typed (built on first use), or None where it cannot run here
    (said once on stderr)."""
    if not _LIB:
        _LIB.append(_build_and_load())
    lib = _LIB[0]
    if lib is not None and functions:
        for name, (restype, argtypes) in functions.items():
            if name not in _TYPED:
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
                _TYPED.add(name)
    return lib


class Binding:
    """One kernel module's functions in the library: typed on first use, the layouts of the structs it mirrors
    (``structs``: {number in ``skv_abi_layout``: ctypes mirror}) checked once. :meth:`library` is None where they
    cannot run here -- switched off (``switch``: an environment variable, on unless ``0``), no AVX2/FMA/F16C, no
    compiler -- the one "does not apply" answer of every binding: its ops then return None and their callers keep
    PyTorch's path."""

    def __init__(self, functions: Signatures, structs: dict[int, type[ctypes.Structure]] | None = None,
                 switch: str | None = None) -> None:
        self.functions, self.structs, self.switch = functions, structs or {}, switch
        self._checked = False

    def library(self) -> ctypes.CDLL | None:
        if self.switch is not None and not switched_on(self.switch):
            return None
        lib = load(self.functions)
        if lib is not None and not self._checked:
            for which, struct in self.structs.items():
                check_layout(lib, which, struct)
            self._checked = True
        return lib


def cpu_form(switch: str, default: str, flag: str) -> bool:
    """Whether an AVX-512 form of the kernels runs: on where ``switch`` (default ``default``) is not ``0`` and the CPU
    has ``flag`` with AVX512-BW and -VL."""
    # platforms.cpu_flags looked up at each call: tests stand in other CPUs' flags
    from swiftkv import platforms

    return os.environ.get(switch, default) != "0" and {flag, "avx512bw", "avx512vl"} <= platforms.cpu_flags()


def check_layout(lib: ctypes.CDLL, which: int, struct: type[ctypes.Structure]) -> None:
    """Raise ``RuntimeError`` unless ``struct`` (a ctypes mirror) has the size and field offsets of the C
    struct number ``which`` in ``skv_abi_layout``."""
    out = (ctypes.c_int64 * 64)()
    n = lib.skv_abi_layout(which, out, 64)
    expected = [ctypes.sizeof(struct)] + [getattr(struct, f[0]).offset for f in struct._fields_]
    if n < 0 or list(out[:n]) != expected:
        raise RuntimeError(f"swiftkv kernels: the C layout of struct {which} ({list(out[:max(n, 0)])}) does not match "
                           f"its Python mirror {struct.__name__} ({expected}); the build is stale or the mirror is wrong")


def _sources() -> list[Path]:
    return sorted(CSRC.glob("*.c"))


def _build_and_load() -> ctypes.CDLL | None:
    if not REQUIRED_FLAGS <= cpu_flags():
        return None
    code = b"".join(f.name.encode() + f.read_bytes() for f in sorted(CSRC.glob("*.[ch]")))
    digest = hashlib.sha256(code + " ".join(FLAGS).encode()).hexdigest()[:16]
    path = cache_dir() / "kernels" / f"libswiftkv-{digest}.so"
    if not path.exists():
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            print("swiftkv: no C compiler found; the CPU kernels are off (PyTorch's path is used)", file=sys.stderr)
            return None

        def build(tmp: Path) -> None:
            with tempfile.TemporaryDirectory() as objs:  # one object per source, then one link
                for src in _sources():
                    subprocess.run([cc, *FLAGS, "-c", str(src), "-o", f"{objs}/{src.stem}.o"], check=True,
                                   capture_output=True, text=True)
                subprocess.run([cc, "-shared", "-fopenmp", *sorted(Path(objs).glob("*.o")), "-o", str(tmp)], check=True,
                               capture_output=True, text=True)

        try:
            atomic_write(path, build)
        except (subprocess.CalledProcessError, OSError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            print(f"swiftkv: could not compile the CPU kernels ({detail.strip()[:300]}); PyTorch's path is used",
                  file=sys.stderr)
            return None
    import torch  # noqa: F401  (its libgomp must be loaded first: the kernels' OpenMP shares it)

    lib = ctypes.CDLL(str(path))
    lib.skv_abi_layout.restype = ctypes.c_int64
    lib.skv_abi_layout.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    return lib
