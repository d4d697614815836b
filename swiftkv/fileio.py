"""Crash-safe writes: a file or a directory appears complete or not at all, and nothing we did
not write is replaced without being asked.

Temporaries live beside their target (same file system, so the final ``os.replace`` is atomic)
and are named ``.NAME.tmp-PID...``; :func:`clean_stale_temps` removes the ones a killed process
left behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_TEMP = re.compile(r"^\..+\.(tmp|old)-(\d+)")
STAMP_FILE = "swiftkv_stamp.txt"  # what a cached directory was built from


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/swiftkv`` (default ``~/.cache/swiftkv``): built-in models, compiled kernels."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "swiftkv"


def umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give ``path`` (and, for a directory, everything in it) the permissions any tool gives new files under
    the user's umask: ``0o666 & ~umask`` for files, ``0o777 & ~umask`` for directories and executables. Temporary
    directories are made 0700 and some writers (safetensors) make 0600 files: a checkpoint written that way
    could not be read by another user, or by a server container reading a mounted volume."""
    mask = umask()
    paths = [path] + (list(path.rglob("*")) if path.is_dir() and not path.is_symlink() else [])
    for p in paths:
        if not p.is_symlink():
            executable = p.is_dir() or p.stat().st_mode & 0o111
            os.chmod(p, (0o777 if executable else 0o666) & ~mask)


def read_json_object(file: Path) -> dict:
    """A JSON object from ``file``, or a ``ValueError`` naming the file and the position."""
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not UTF-8 text; restore or re-download it.") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                         "fix or re-download it.") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{file} must hold a JSON object, not {type(obj).__name__}.")
    return obj


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place.

    The temporary keeps ``path``'s suffix (matplotlib infers the image format from it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 1) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != 0


def clean_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove temporaries in ``directory`` left by processes that no longer run. Returns them."""
    directory, removed = Path(directory), []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = _TEMP.match(p.name)
        if m and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def is_swiftkv_checkpoint(path: Path) -> bool:
    """A directory swiftkv wrote: config.json says ``"swiftkv": true`` (or carries our stamp)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (config.get("swiftkv") is True or (path / STAMP_FILE).exists())


def check_replaceable(out: Path, overwrite: bool = False) -> None:
    """Refuse (``ValueError``) to replace a file, or a non-empty directory that is not a swiftkv
    checkpoint, unless ``overwrite``."""
    if overwrite or not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; choose another output path "
                         "(or pass --overwrite to replace it).")
    if any(out.iterdir()) and not is_swiftkv_checkpoint(out):
        raise ValueError(f"{out} is a non-empty directory that is not a swiftkv checkpoint; refusing to replace "
                         "its contents. Choose a new or empty directory (or pass --overwrite to replace it).")


@contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces ``out`` in one rename.

    ``out`` may be missing, empty or a swiftkv checkpoint; anything else needs ``overwrite``
    (:func:`check_replaceable`). On an exception ``out`` is left exactly as it was.
    """
    out = Path(out).resolve()
    check_replaceable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        apply_umask(tmp)
        old = None
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)



def stamp_matches(directory: Path, stamp: str) -> bool:
    """Whether a cached directory was built from exactly ``stamp`` (see :func:`write_stamp`)."""
    marker = directory / STAMP_FILE
    return (directory / "config.json").exists() and marker.exists() and marker.read_text().strip() == stamp


def write_stamp(directory: Path, stamp: str) -> None:
    """Record what a cached directory was built from (written last: a crash leaves it stale)."""
    atomic_write_text(directory / STAMP_FILE, stamp + "\n")
