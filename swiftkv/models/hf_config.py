"""The SwiftKV transformers config classes (``llama_swiftkv``, ``qwen2_swiftkv``): what reading a SwiftKV
checkpoint's ``config.json`` needs, without the model (the vLLM plugin registers only these)."""

from __future__ import annotations

from transformers import AutoConfig, LlamaConfig, Qwen2Config


class LlamaSwiftKVConfig(LlamaConfig):
    model_type = "llama_swiftkv"
    swiftkv: bool = False
    num_key_value_layers: int | None = None
    key_value_group_size: int = 1


class Qwen2SwiftKVConfig(Qwen2Config):
    model_type = "qwen2_swiftkv"
    swiftkv: bool = False
    num_key_value_layers: int | None = None
    key_value_group_size: int = 1


SWIFTKV_CONFIGS = {"llama": LlamaSwiftKVConfig, "mistral": LlamaSwiftKVConfig, "qwen2": Qwen2SwiftKVConfig}


def register_configs() -> None:
    """Register the config classes with ``AutoConfig`` (idempotent)."""
    for cfg in (LlamaSwiftKVConfig, Qwen2SwiftKVConfig):
        AutoConfig.register(cfg.model_type, cfg, exist_ok=True)
