"""Base model -> SwiftKV model, initialised as the paper and reference code do.

``q_proj_swiftkv`` = copy of ``q_proj``; a group leader's ``k/v_proj_swiftkv`` = mean of its
AcrossKV group's original ``k_proj``/``v_proj`` (biases too); ``norm_swiftkv`` = copy of layer
``l``'s ``input_layernorm``. Optional low-rank adapters (``adapter_rank > 0``, off by default) start
as a no-op: ``B = 0``.
"""

from __future__ import annotations

import torch

from swiftkv.config import SwiftKVConfig
from swiftkv.models.llama import LlamaForCausalLM


_SWIFTKV_FIELDS = ("swiftkv", "num_key_value_layers", "key_value_group_size", "swiftkv_adapter_rank")


def _plain_fields(config) -> dict:
    """The config's fields without its type and SwiftKV settings."""
    fields = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", *_SWIFTKV_FIELDS):
        fields.pop(key, None)
    return fields


def swiftkv_hf_config(base_config, skv: SwiftKVConfig, adapter_rank: int = 0):
    """The published-format config (``llama_swiftkv`` / ``qwen2_swiftkv``) for ``base_config``."""
    from swiftkv.models.hf import SWIFTKV_CONFIGS

    base_type = base_config.model_type.removesuffix("_swiftkv")
    fields = _plain_fields(base_config)
    fields.update(swiftkv=True, num_key_value_layers=skv.num_key_value_layers,
                  key_value_group_size=skv.key_value_group_size)
    if adapter_rank:  # recorded so the checkpoint reloads with its adapters; absent = published format
        fields["swiftkv_adapter_rank"] = adapter_rank
    config = SWIFTKV_CONFIGS[base_type](**fields)
    config.architectures = ["Qwen2SwiftKVForCausalLM" if base_type == "qwen2" else "LlamaSwiftKVForCausalLM"]
    return config


def base_hf_config(config):
    """The inverse: the plain ``llama`` / ``qwen2`` config of the original model (what other engines load)."""
    from swiftkv.models.hf import SWIFTKV_CONFIGS

    base_type = config.model_type.removesuffix("_swiftkv")
    plain_cls = SWIFTKV_CONFIGS[base_type].__mro__[1]  # LlamaConfig / Qwen2Config
    plain = plain_cls(**_plain_fields(config))
    plain.architectures = ["Qwen2ForCausalLM" if base_type == "qwen2" else "LlamaForCausalLM"]
    return plain


@torch.no_grad()
def to_swiftkv(base: LlamaForCausalLM, skv: SwiftKVConfig, adapter_rank: int = 0) -> LlamaForCausalLM:
    """Return a SwiftKV model sharing ``base``'s tensors, with initialised SwiftKV projections
    (and, for ``adapter_rank > 0``, zero-output low-rank adapters on the later layers)."""
    if not base.teacher_available:
        raise ValueError("The base model lacks its original q/k/v; convert from a full checkpoint.")
    if skv.num_layers != base.config.num_hidden_layers:
        raise ValueError(f"SwiftKV config is for {skv.num_layers} layers; the model has {base.config.num_hidden_layers}.")
    param = base.model.embed_tokens.weight
    with torch.device("meta"):
        model = LlamaForCausalLM(swiftkv_hf_config(base.config, skv, adapter_rank))
    state = {n: p for n, p in base.named_parameters() if "swiftkv" not in n}
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    layers = model.model.layers
    L, l, g = skv.num_layers, skv.num_key_value_layers, skv.key_value_group_size

    def new(t: torch.Tensor) -> torch.nn.Parameter:
        return torch.nn.Parameter(t.detach().clone().to(param.device, param.dtype), requires_grad=False)

    if l < L:
        model.model.norm_swiftkv.weight = new(layers[l].input_layernorm.weight)
    for i in range(l, L):
        attn = layers[i].self_attn
        attn.q_proj_swiftkv.weight = new(attn.q_proj.weight)
        if attn.q_proj.bias is not None:
            attn.q_proj_swiftkv.bias = new(attn.q_proj.bias)
        if skv.is_group_leader(i):
            group = [layers[j].self_attn for j in range(i, i + g)]
            for name in ("k_proj", "v_proj"):
                dst = getattr(attn, f"{name}_swiftkv")
                dst.weight = new(torch.stack([getattr(a, name).weight.float() for a in group]).mean(0))
                if dst.bias is not None:
                    dst.bias = new(torch.stack([getattr(a, name).bias.float() for a in group]).mean(0))
        for adapter in (attn.o_adapter_swiftkv, layers[i].mlp_adapter_swiftkv):
            if adapter is not None:
                adapter.to_empty(device=param.device).to(param.dtype).reset_parameters()
    model.eval().requires_grad_(False)
    return model
