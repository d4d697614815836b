"""Safetensors checkpoints tensor by tensor, in transformers' layout (``model.safetensors``, or
``model-0000i-of-0000N.safetensors`` shards with ``model.safetensors.index.json``).

:func:`weight_files` lists a directory's files; :func:`read_tensors` maps them (zero-copy: a tensor is
the file's pages); :func:`tensor_index` says what they hold (names, dtypes, shapes) without reading any
tensor; :func:`read_tensor` reads one into private memory (``pread``: the file is never mapped, so a
streaming job's resident memory is what it holds, not what it has read); :func:`write_sharded` writes
tensors one shard at a time (at most one shard's tensors in memory: peak memory is about one shard,
whatever the checkpoint's size).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from swiftkv.fileio import read_json_object

INDEX_FILE = "model.safetensors.index.json"
WEIGHT_FILES = ("model.safetensors", INDEX_FILE)
DEFAULT_SHARD_SIZE = "5GB"  # transformers' save_pretrained default
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor is stored and what it is, read from the file's header only."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory (the shards its index lists, or ``model.safetensors``)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise ValueError(f"{index} has no weight_map of tensor name -> shard file; re-download it.")
        shards = []
        for s in sorted(set(weight_map.values())):
            # judged as written: a shard may be a symlink out of the directory (the Hugging Face cache stores
            # snapshots/REV/model-00001-of-00002.safetensors -> ../../blobs/HASH), but not a path that climbs out
            if Path(s).is_absolute() or ".." in Path(s).parts:
                raise ValueError(f"{index} names the shard {s!r}, which is outside {path}; refusing to load it.")
            shards.append(path / s)
        return shards
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise ValueError(f"No safetensors weights in {path} (expected one of {', '.join(WEIGHT_FILES)}).")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory's (possibly sharded) safetensors files."""
    tensors = {}
    for f in weight_files(path):
        if not f.exists():
            raise ValueError(f"Weight shard {f.name} listed in the index is missing from {path}.")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    tensors[name] = sf.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{f} is not a valid safetensors file (corrupt or truncated?): {e}") from e
    return tensors


MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header


def read_header(f: Path) -> dict[str, dict]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets), read as the format
    defines it -- an 8-byte little-endian length, then that much JSON -- without mapping the file (a file larger
    than memory is described, not mapped). A file that is not a valid one: ``ValueError`` naming it."""
    bad = f"{f} is not a valid safetensors file (corrupt or truncated?)"
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"{bad}: its header length {n} does not fit the file's {size} bytes; "
                                 "re-download or re-convert it.")
            header = json.loads(fh.read(n))
    except OSError as e:
        raise ValueError(f"{bad}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{bad}: its header is not JSON ({e}); re-download or re-convert it.") from None
    if not isinstance(header, dict):
        raise ValueError(f"{bad}: its header is not a JSON object; re-download or re-convert it.")
    end = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
              and isinstance(entry.get("shape"), list) and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
              and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
              and all(isinstance(o, int) for o in entry["data_offsets"])
              and 0 <= entry["data_offsets"][0] <= entry["data_offsets"][1] <= end)
        if not ok:
            raise ValueError(f"{bad}: the header's entry for {name!r} is malformed or points past the end of the "
                             "file; re-download or re-convert it.")
    return header


def tensor_index(files: list[Path]) -> dict[str, TensorInfo]:
    """Every tensor of ``files`` (names -> :class:`TensorInfo`), from their headers alone; a name in two files is
    an error, and so is a dtype swiftkv does not read."""
    index: dict[str, TensorInfo] = {}
    for f in files:
        if not f.exists():
            raise ValueError(f"Weight shard {f.name} listed in the index is missing from {f.parent}.")
        for name, entry in read_header(f).items():
            if name == "__metadata__":
                continue
            if name in index:
                raise ValueError(f"tensor {name} is stored twice ({index[name].file.name} and {f.name})")
            dtype = _DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"{f}: tensor {name} has dtype {entry['dtype']}, which swiftkv does not read")
            info = TensorInfo(f, dtype, tuple(entry["shape"]))
            if entry["data_offsets"][1] - entry["data_offsets"][0] != info.nbytes:
                raise ValueError(f"{f} is not a valid safetensors file (corrupt or truncated?): tensor {name} has "
                                 f"{entry['data_offsets'][1] - entry['data_offsets'][0]} bytes for its shape's "
                                 f"{info.nbytes}; re-download or re-convert it.")
            index[name] = info
    return index


def read_tensor(info: TensorInfo, name: str) -> torch.Tensor:
    """One tensor, read into memory of its own (not a view of a mapped file)."""
    with safe_open(str(info.file), framework="pt", backend="pread") as sf:
        return sf.get_tensor(name)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"500MB"``, ``"2GiB"`` (as transformers reads them)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"shard size {size!r}: use bytes or e.g. 5GB, 500MB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Names grouped into shards in order, each under ``max_shard_bytes`` unless one tensor alone is larger."""
    shards: list[list[str]] = [[]]
    total = 0
    for name, nbytes in sizes:
        if shards[-1] and total + nbytes > max_shard_bytes:
            shards.append([])
            total = 0
        shards[-1].append(name)
        total += nbytes
    return shards


def write_sharded(out_dir: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                  produce: Callable[[str], torch.Tensor], max_shard_size: int | str = DEFAULT_SHARD_SIZE,
                  desc: str = "writing") -> list[Path]:
    """Write the tensors ``specs`` describes (name -> (dtype, shape), in order) into ``out_dir``, asking
    ``produce(name)`` for each when its shard is written. Returns the files written."""
    nbytes = {n: TensorInfo(Path(), dt, tuple(shape)).nbytes for n, (dt, shape) in specs.items()}
    shards = plan_shards(list(nbytes.items()), parse_size(max_shard_size))
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    written = []
    with tqdm(total=sum(nbytes.values()), unit="B", unit_scale=True, desc=desc, disable=None) as bar:
        for file, shard in zip(names, shards):
            tensors = {}
            for name in shard:
                t = produce(name).contiguous()
                dtype, shape = specs[name]
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{name}: produced {t.dtype} {tuple(t.shape)}, planned {dtype} {tuple(shape)}")
                tensors[name] = t
            save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
            written.append(out_dir / file)
            bar.update(sum(nbytes[n] for n in shard))
            del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes.values())},
                 "weight_map": {n: file for file, shard in zip(names, shards) for n in shard}}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
        written.append(out_dir / INDEX_FILE)
    return written
