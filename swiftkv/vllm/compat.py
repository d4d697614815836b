"""The vLLM internals the plugin leans on, in one place (tested against vllm 0.32).

Only the KV-cache write op (what ``Attention.forward`` calls before attending) and the input
validation hook that refuses prompt logprobs under fast prefill live here; everything else uses
vLLM's public model-building API.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.attention import attention as _attention
from vllm.utils.torch_utils import _encode_layer_name

TESTED_VLLM = "0.32"  # register() warns on another version


def write_kv_cache(attn, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Write ``key``/``value`` [num_tokens, kv_heads * head_dim] into ``attn``'s own KV cache at this
    step's slots, exactly as ``Attention.forward`` does, without attending. Returns the op's empty
    dependency tensor."""
    key = key.view(-1, attn.num_kv_heads, attn.head_size)
    value = value.view(-1, attn.num_kv_heads, attn.head_size_v)
    if attn.use_direct_call:
        return _attention.unified_kv_cache_update(key, value, attn.layer_name)
    return torch.ops.vllm.unified_kv_cache_update(key, value, _encode_layer_name(attn.layer_name))


def attend_shared_kv(attn, query: torch.Tensor, kv_dep: torch.Tensor) -> torch.Tensor:
    """``attn(query, None, None)`` for a KV-sharing layer, plus the dependency on its K/V write:
    what ``Attention.forward`` does when it writes K/V itself (``kv_cache_dummy_dep``)."""
    output = torch.empty(query.shape[0], attn.num_heads * attn.head_size_v, dtype=query.dtype, device=query.device)
    q = query.view(-1, attn.num_heads, attn.head_size)
    out = output.view(-1, attn.num_heads, attn.head_size_v)
    if attn.use_direct_call:
        _attention.unified_attention_with_output(q, None, None, out, attn.layer_name, kv_cache_dummy_dep=kv_dep)
    else:
        torch.ops.vllm.unified_attention_with_output(q, None, None, out, _encode_layer_name(attn.layer_name),
                                                     kv_cache_dummy_dep=kv_dep)
    return output


def refuse_prompt_logprobs_under_fast_prefill(is_swiftkv) -> None:
    """Wrap vLLM's request validation: with the prefill skip on, a SwiftKV model computes no hidden
    states of the later layers for prompt tokens, so prompt logprobs would be silently wrong.
    ``is_swiftkv(vllm_config)`` says whether the served model is one."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor._validate_params
    if getattr(original, "_swiftkv_wrapped", False):
        return

    def _validate_params(self, params, *args, **kwargs):
        if (getattr(params, "prompt_logprobs", None) is not None and is_swiftkv(self.vllm_config)
                and self.vllm_config.cache_config.kv_sharing_fast_prefill):
            raise VLLMValidationError(
                "prompt_logprobs are not computed by SwiftKV's prefill skip (the later layers see only "
                "the last prompt token); start vLLM with SWIFTKV_VLLM_FAST_PREFILL=0 to serve them exactly "
                "(slower prefill)", parameter="prompt_logprobs")
        return original(self, params, *args, **kwargs)

    _validate_params._swiftkv_wrapped = True
    InputProcessor._validate_params = _validate_params
