"""Small C kernels for the CPU path (``layers/csrc/*.c``), compiled once with the system C compiler
into the cache and called through ctypes.

Each kernel is AVX2 + FMA with OpenMP (torch's own libgomp, loaded first). Where it cannot run (no
AVX2/FMA, no C compiler, a failed build) :func:`load` returns None, said once on stderr, and the
caller keeps its PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]

# name -> (restype, argtypes) per exported function
Signatures = dict[str, tuple[type, list[type]]]
_LIBS: dict[str, ctypes.CDLL | None] = {}


def load(source: str, functions: Signatures) -> ctypes.CDLL | None:
    """The compiled ``csrc/<source>`` with ``functions`` typed, built on first use, or None where it
    cannot run here."""
    if source not in _LIBS:
        _LIBS[source] = _build_and_load(CSRC / source, functions)
    return _LIBS[source]


def _build_and_load(src: Path, functions: Signatures) -> ctypes.CDLL | None:
    from swiftkv.fileio import atomic_write
    from swiftkv.models.registry import cache_dir
    from swiftkv.platforms import cpu_flags

    if not {"avx2", "fma"} <= cpu_flags():
        return None
    # with every file it may include (headers, and the kernels fused_decode.c builds on)
    code = src.read_bytes() + b"".join(f.read_bytes() for f in sorted(CSRC.glob("*.[ch]")))
    digest = hashlib.sha256(code + " ".join(FLAGS).encode()).hexdigest()[:16]
    path = cache_dir() / "kernels" / f"{src.stem}-{digest}.so"
    if not path.exists():
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            print(f"swiftkv: no C compiler found; {src.stem} off (PyTorch's path is used)", file=sys.stderr)
            return None

        def build(tmp: Path) -> None:
            subprocess.run([cc, *FLAGS, str(src), "-o", str(tmp)], check=True, capture_output=True, text=True)

        try:
            atomic_write(path, build)
        except (subprocess.CalledProcessError, OSError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            print(f"swiftkv: could not compile {src.name} ({detail.strip()[:200]}); PyTorch's path is used",
                  file=sys.stderr)
            return None
    import torch  # noqa: F401  (its libgomp must be loaded first: the kernels' OpenMP shares it)

    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in functions.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib
