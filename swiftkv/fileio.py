"""Crash-safe writes: a file or a directory appears complete or not at all, and nothing we did
not write is replaced without being asked.

Temporaries live beside their target (same file system, so the final ``os.replace`` is atomic)
and are named ``.NAME.swiftkv-tmp-PID-RANDOM`` (``swiftkv-old`` for a directory being replaced);
:func:`clean_stale_temps` removes the ones a killed process left behind, and only names of that form:
a user's ``.bashrc.old-2024`` or ``.vim.tmp-1`` is never ours to delete.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_TEMP = re.compile(r"^\..+\.swiftkv-(tmp|old)-(\d+)-[0-9a-z_]{8}")  # what _temp_name and mkdtemp make


def _temp_prefix(target: str, kind: str = "tmp") -> str:
    """``.TARGET.swiftkv-KIND-PID-``: the start of a name only swiftkv makes, with the writer's PID (stale once it
    died); 8 random characters follow (``_TEMP``)."""
    return f".{target}.swiftkv-{kind}-{os.getpid()}-"


def _temp_name(target: str, kind: str = "tmp") -> str:
    return _temp_prefix(target, kind) + secrets.token_hex(4)
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


def apply_umask(path: Path, keep_modes: dict[str, int] | None = None) -> None:
    """Give ``path`` (and, for a directory, everything in it) the permissions any tool gives new files under
    the user's umask: ``0o666 & ~umask`` for files, ``0o777 & ~umask`` for directories and executables. Temporary
    directories are made 0700 and some writers (safetensors) make 0600 files: a checkpoint written that way
    could not be read by another user, or by a server container reading a mounted volume. ``keep_modes``
    (name in ``path`` -> the source file's mode): copies that keep their source's stricter permissions (a 0600
    file stays 0600)."""
    mask = umask()
    paths = [path] + (list(path.rglob("*")) if path.is_dir() and not path.is_symlink() else [])
    for p in paths:
        if not p.is_symlink():
            executable = p.is_dir() or p.stat().st_mode & 0o111
            os.chmod(p, (0o777 if executable else 0o666) & ~mask)
    for name, mode in (keep_modes or {}).items():  # files copied from the user's: never more open than the source
        os.chmod(path / name, mode & 0o777 & ~mask)


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
    tmp = path.with_name(_temp_name(path.stem) + path.suffix)
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


# the files a checkpoint carries beside its config and weights (copied from the model it was made from; nothing
# else: not a README, not a 2 GB .gguf) -- tokenizer, chat template, generation config, licence
SIDE_FILES = re.compile(r"^(generation_config\.json|tokenizer\.json|tokenizer_config\.json|tokenizer\.model|"
                        r"special_tokens_map\.json|added_tokens\.json|vocab\.json|merges\.txt|"
                        r"chat_template\.(jinja|json)|(LICENSE|NOTICE|USE_POLICY)(\.md|\.txt)?)$")
# what a checkpoint swiftkv writes may hold: replacing it deletes nothing else
CHECKPOINT_FILES = re.compile(r"^(config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
                              + re.escape(STAMP_FILE) + ")$|" + SIDE_FILES.pattern)


def check_replaceable(out: Path, overwrite: bool = False) -> None:
    """Refuse (``ValueError``) to replace a file, a non-empty directory that is not a swiftkv checkpoint, or a
    checkpoint holding files the format does not explain (a README, ``.git/``, eval results kept in it: replacing
    the directory would delete them), unless ``overwrite``."""
    if overwrite or not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; choose another output path "
                         "(or pass --overwrite to replace it).")
    if any(out.iterdir()) and not is_swiftkv_checkpoint(out):
        raise ValueError(f"{out} is a non-empty directory that is not a swiftkv checkpoint; refusing to replace "
                         "its contents. Choose a new or empty directory (or pass --overwrite to replace it).")
    extra = sorted(p.name for p in out.iterdir() if not CHECKPOINT_FILES.match(p.name))
    if extra:
        raise ValueError(f"{out} is a swiftkv checkpoint that also holds {', '.join(extra[:5])}"
                         f"{' ...' if len(extra) > 5 else ''}, which replacing it would delete; move them out or "
                         "choose another output directory (or pass --overwrite to replace it all).")


@contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False,
                     keep_modes: dict[str, int] | None = None) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces ``out`` in one rename.

    ``out`` may be missing, empty or a swiftkv checkpoint of only the files the format explains; anything
    else needs ``overwrite`` (:func:`check_replaceable`). On an exception ``out`` is left exactly as it was.
    ``keep_modes``, filled by the caller while writing: files whose (stricter) permissions to keep
    (:func:`apply_umask`).
    """
    out = Path(out).resolve()
    check_replaceable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out.name), dir=out.parent))  # + mkdtemp's 8 random chars
    try:
        yield tmp
        apply_umask(tmp, keep_modes)
        old = None
        if out.exists() or out.is_symlink():
            old = out.parent / _temp_name(out.name, "old")
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
