"""vLLM config hook for SwiftKV checkpoints: validate the layout, switch the prefill skip on."""

from __future__ import annotations

import os

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

logger = init_logger(__name__)
FAST_PREFILL_ENV = "SWIFTKV_VLLM_FAST_PREFILL"


def is_swiftkv(vllm_config) -> bool:
    from swiftkv.vllm import ARCHITECTURES

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
        from swiftkv.vllm.model import swiftkv_layout

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
