"""vLLM config hook for SwiftKV checkpoints: validate the layout, switch the prefill skip on."""

from __future__ import annotations

import os

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from swiftkv.config import SwiftKVConfig
from swiftkv.models.arch import adapter_rank_of, swiftkv_config_of

logger = init_logger(__name__)
FAST_PREFILL_ENV = "SWIFTKV_VLLM_FAST_PREFILL"
ARCHITECTURES = ("LlamaSwiftKVForCausalLM", "Qwen2SwiftKVForCausalLM")


def swiftkv_layout(config) -> SwiftKVConfig:
    """The checkpoint's SwiftKV layout (read as the model definition reads it, :mod:`swiftkv.models.arch`);
    ``ValueError`` (one line) for what the plugin cannot run."""
    if not getattr(config, "swiftkv", False) or getattr(config, "num_key_value_layers", None) is None:
        raise ValueError(f"{config.model_type} config has swiftkv={getattr(config, 'swiftkv', None)} and "
                         f"num_key_value_layers={getattr(config, 'num_key_value_layers', None)}: not a SwiftKV "
                         "checkpoint; serve the original model with its own architecture")
    skv = swiftkv_config_of(config)
    if skv.is_baseline:
        raise ValueError(f"num_key_value_layers = num_hidden_layers = {skv.num_layers}: no SwiftKV layer; "
                         "serve it as a plain Llama/Qwen2 checkpoint")
    if adapter_rank_of(config):
        raise ValueError(f"swiftkv_adapter_rank={config.swiftkv_adapter_rank}: the vLLM plugin runs rank-0 "
                         "(published-format) checkpoints only; distill without --adapter-rank, or serve with "
                         "`swiftkv serve`")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config.hidden_act!r}: the vLLM plugin supports silu MLPs only")
    return skv


def is_swiftkv(vllm_config) -> bool:
    model_config = getattr(vllm_config, "model_config", None)
    return model_config is not None and model_config.architecture in ARCHITECTURES


def fast_prefill_wanted() -> bool:
    value = os.environ.get(FAST_PREFILL_ENV, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on"):
        raise ValueError(f"{FAST_PREFILL_ENV}={value!r}: use 1 (prefill skip on, the default) or 0")
    return value in ("1", "true", "on")


class SwiftKVVllmConfig(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        skv = swiftkv_layout(vllm_config.model_config.hf_config)  # ValueError: one clear line
        cache = vllm_config.cache_config
        if fast_prefill_wanted():
            cache.kv_sharing_fast_prefill = True
        else:
            cache.kv_sharing_fast_prefill = False
            logger.warning("SwiftKV prefill skip is off (%s=0): every prompt token runs all %d layers",
                           FAST_PREFILL_ENV, skv.num_layers)
        logger.info("SwiftKV: l=%d of L=%d, AcrossKV G=%d, KV cache for %d of %d layers, prefill skip %s",
                    skv.num_key_value_layers, skv.num_layers, skv.key_value_group_size, skv.num_kv_owners,
                    skv.num_layers, "on" if cache.kv_sharing_fast_prefill else "off")
