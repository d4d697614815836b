"""What a transformers config describes, as the model definition reads it: whether swiftkv can run
the architecture, its SwiftKV layout, the optional adapters' rank and the projections' biases."""

from __future__ import annotations

import torch

from swiftkv.config import SwiftKVConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "llama_swiftkv", "qwen2_swiftkv")


SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads")


def check_sizes(values: dict) -> None:
    """``ValueError`` for a size in ``values`` (config field -> value; from :data:`SIZES`) that is not a positive
    integer: transformers fails on some with a bare ``ZeroDivisionError``, accepts others."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"config: {name} must be a positive integer, got {value!r}; fix config.json.")


def check_supported(config) -> None:
    """Raise a clear ``ValueError`` for architectures or features this model cannot run."""
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Unsupported architecture model_type={mt!r} "
            f"({getattr(config, 'architectures', None)}). Supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    check_sizes({name: getattr(config, name, None) for name in SIZES})
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(f"config: num_attention_heads ({config.num_attention_heads}) must be a multiple of "
                         f"num_key_value_heads ({config.num_key_value_heads}); fix config.json.")
    if getattr(config, "head_dim", None) is None and config.hidden_size % config.num_attention_heads:
        raise ValueError(f"config: hidden_size ({config.hidden_size}) is not a multiple of num_attention_heads "
                         f"({config.num_attention_heads}) and no head_dim is given; fix config.json.")
    if getattr(config, "sliding_window", None) and (mt == "mistral" or getattr(config, "use_sliding_window", False)):
        raise ValueError(
            f"{mt} config uses sliding-window attention (sliding_window={config.sliding_window}), "
            "which swiftkv does not support; set sliding_window to null for full attention."
        )


def swiftkv_config_of(config) -> SwiftKVConfig:
    """The SwiftKV layout stored in a (possibly plain) transformers config."""
    L = config.num_hidden_layers
    if not getattr(config, "swiftkv", False):
        return SwiftKVConfig.baseline(L)
    return SwiftKVConfig(L, config.num_key_value_layers, getattr(config, "key_value_group_size", 1))


def adapter_rank_of(config) -> int:
    """Rank of the optional SwiftKV low-rank adapters (0: none, the published format)."""
    rank = getattr(config, "swiftkv_adapter_rank", 0) or 0
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"swiftkv_adapter_rank must be an integer >= 0; got {rank!r}.")
    return rank


def attention_biases(config) -> tuple[bool, bool]:
    """(q/k/v bias, o bias) for the architecture."""
    if config.model_type.startswith("qwen2"):
        return True, False
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


def head_dim_of(config) -> int:
    """Attention head size: ``head_dim`` where the config sets it, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_bytes_per_token(config, skv: SwiftKVConfig, dtype: torch.dtype) -> int:
    """Bytes of K and V one token occupies across all KV owners of layout ``skv``."""
    elem = torch.empty((), dtype=dtype).element_size()
    return skv.num_kv_owners * 2 * config.num_key_value_heads * head_dim_of(config) * elem
