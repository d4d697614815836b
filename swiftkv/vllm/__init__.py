"""swiftkv's vLLM plugin: ``vllm serve DIR`` / ``vllm.LLM(DIR)`` run SwiftKV checkpoints.

vLLM finds :func:`register` through the ``vllm.general_plugins`` entry point and calls it in
every vLLM process. Nothing in swiftkv imports this subpackage, and importing it imports no vLLM:
vLLM is imported inside :func:`register` only.

What it does: registers the SwiftKV transformers config classes, the model class
(:mod:`swiftkv.vllm.model`) for ``LlamaSwiftKVForCausalLM`` and ``Qwen2SwiftKVForCausalLM``, a
config hook that validates the layout and switches vLLM's ``kv_sharing_fast_prefill`` on (the
prefill skip; ``SWIFTKV_VLLM_FAST_PREFILL=0`` switches it off), and a request check that refuses
prompt logprobs while the skip is on (they would be wrong).
"""

from __future__ import annotations

MODEL_CLASS = "swiftkv.vllm.model:SwiftKVForCausalLM"


def register() -> None:
    """Entry point for ``vllm.general_plugins`` (idempotent)."""
    import warnings

    import vllm
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from swiftkv.models.hf_config import register_configs
    from swiftkv.vllm.compat import (
        TESTED_VLLM,
        refuse_prompt_logprobs_under_fast_prefill,
    )
    from swiftkv.vllm.config import ARCHITECTURES, SwiftKVVllmConfig, is_swiftkv

    version = getattr(vllm, "__version__", "?")
    if not version.startswith(TESTED_VLLM + "."):
        warnings.warn(f"swiftkv's vLLM plugin is tested with vLLM {TESTED_VLLM}.x; this is vLLM {version}: the "
                      "vLLM internals it uses (swiftkv/vllm/compat.py) may have changed", stacklevel=2)
    register_configs()
    supported = set(ModelRegistry.get_supported_archs())
    for arch in ARCHITECTURES:
        if arch not in supported:
            ModelRegistry.register_model(arch, MODEL_CLASS)
        MODELS_CONFIG_MAP[arch] = SwiftKVVllmConfig
    refuse_prompt_logprobs_under_fast_prefill(is_swiftkv)
