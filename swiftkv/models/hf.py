"""transformers registration: ``AutoConfig`` / ``AutoModelForCausalLM`` load SwiftKV checkpoints.

The classes are thin wrappers around :class:`swiftkv.models.llama.LlamaForCausalLM`, so
``model(input_ids).logits`` has SwiftKV semantics and tools built on transformers
(lm-evaluation-harness, accelerate) can use a SwiftKV directory like any other model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from swiftkv.layers.attention import AttentionMetadata
from swiftkv.models.hf_config import (
    LlamaSwiftKVConfig,
    Qwen2SwiftKVConfig,
    register_configs,
)
from swiftkv.models.llama import SwiftKVCausalLM


class _SwiftKVPreTrainedModel(SwiftKVCausalLM, PreTrainedModel):
    """transformers-facing forward over the flat-layout model (no KV cache: ``use_cache=False``)."""

    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _supports_sdpa = True

    def __init__(self, config) -> None:
        PreTrainedModel.__init__(self, config)
        self._build(config)
        self.post_init()
        if getattr(self, "generation_config", None) is not None:
            self.generation_config.use_cache = False

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Padded ``[B, T]`` batch (left or right padding) -> logits ``[B, T, vocab]``."""
        b, t = input_ids.shape
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        lens = [n for n in valid.sum(1).tolist() if n > 0]
        positions = torch.cat([torch.arange(n, device=input_ids.device) for n in lens])
        hidden = SwiftKVCausalLM.forward(self, input_ids[valid], positions, AttentionMetadata.full(lens))
        flat_logits = self.lm_head(hidden)
        logits = flat_logits.new_zeros(b, t, flat_logits.shape[-1])
        logits[valid] = flat_logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)


class LlamaSwiftKVForCausalLM(_SwiftKVPreTrainedModel, GenerationMixin):
    config_class = LlamaSwiftKVConfig


class Qwen2SwiftKVForCausalLM(_SwiftKVPreTrainedModel, GenerationMixin):
    config_class = Qwen2SwiftKVConfig


def register() -> None:
    """Register the SwiftKV config and model classes with transformers' Auto classes (idempotent)."""
    register_configs()
    for cfg, model in ((LlamaSwiftKVConfig, LlamaSwiftKVForCausalLM), (Qwen2SwiftKVConfig, Qwen2SwiftKVForCausalLM)):
        AutoModelForCausalLM.register(cfg, model, exist_ok=True)
