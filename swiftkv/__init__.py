"""swiftkv: SwiftKV (arXiv 2410.03960) transformation, distillation and serving for Llama-family LLMs."""

from swiftkv.config import SwiftKVConfig
from swiftkv.models.hf import register as _register_with_transformers
from swiftkv.sampling_params import SamplingParams

_register_with_transformers()

__all__ = ["LLM", "SamplingParams", "SwiftKVConfig"]


def __getattr__(name: str):
    if name == "LLM":  # lazy: keeps `import swiftkv` light for the transformers registration
        from swiftkv.llm import LLM

        return LLM
    raise AttributeError(name)
__version__ = "0.1.0"
