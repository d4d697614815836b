"""swiftkv: SwiftKV (arXiv 2410.03960) transformation, distillation and serving for Llama-family LLMs."""

from swiftkv.config import SwiftKVConfig
from swiftkv.models.hf import register as _register_with_transformers

_register_with_transformers()

__all__ = ["SwiftKVConfig"]
__version__ = "0.1.0"
