"""SwiftKV checkpoints (``llama_swiftkv``, ``qwen2_swiftkv``) as a vLLM model, built from vLLM's layers.

Layout of an ``L``-layer model with ``l = num_key_value_layers`` and AcrossKV group size ``G``:

- layers ``0..l-1`` are vLLM's own ``LlamaDecoderLayer`` (each owns its KV cache);
- one *KV writer* per AcrossKV group: an ``Attention`` that owns the group's KV cache and never
  attends. After layer ``l-1`` the model computes the SingleInputKV K/V of every group
  (``norm_swiftkv`` -> ``k/v_proj_swiftkv`` -> RoPE) and writes them into the writers' caches
  with vLLM's own KV-cache write op;
- layers ``l..L-1`` compute only their query (``q_proj_swiftkv``) and attend over their group
  writer's cache (``kv_sharing_target_layer_name``): vLLM allocates no cache for them, so the
  cache holds ``l + (L-l)/G`` layers' worth per token (AcrossKV's memory cut is real).

Because layers ``l..L-1`` are the trailing run of KV-sharing layers, vLLM's
``kv_sharing_fast_prefill`` gives them attention metadata for the logits rows only, and this model
runs them on those rows only: the prefill skip. The plugin switches it on for these
architectures (``swiftkv.vllm.register``). As in vLLM's Gemma 3n, the two halves are compiled
separately (``support_torch_compile``) around the eager row selection.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.models.llama import LlamaDecoderLayer
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    extract_layer_index,
    maybe_prefix,
)
from vllm.v1.attention.backends.utils import KVSharingFastPrefillMetadata

from swiftkv.config import SwiftKVConfig
from swiftkv.models.arch import head_dim_of
from swiftkv.vllm.compat import attend_shared_kv, write_kv_cache
from swiftkv.vllm.config import swiftkv_layout


def _prepare_hf_config(config) -> None:
    """Let vLLM's ``LlamaDecoderLayer`` build Qwen2 layers too: q/k/v biases, no o_proj bias."""
    if config.model_type.startswith("qwen2"):
        config.qkv_bias = True
        config.attention_bias = False


def _writer_prefix(model_prefix: str, skv: SwiftKVConfig, owner: int) -> str:
    # numbered after the real layers, so vLLM's one-integer-per-attention-layer bookkeeping stays unique
    return f"{model_prefix}.swiftkv_writers.{skv.num_layers + owner - skv.num_key_value_layers}"


class SwiftKVAttention(nn.Module):
    """Attention of a later layer: its own query, its AcrossKV group's K/V (read from the writer)."""

    def __init__(self, config, hidden_size: int, num_heads: int, num_kv_heads: int, max_position_embeddings: int,
                 quant_config=None, bias: bool = False, bias_o_proj: bool = False, cache_config=None,
                 prefix: str = "", **_) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        layer, skv = extract_layer_index(prefix), swiftkv_layout(config)
        self.head_dim = head_dim_of(config)
        self.num_heads = num_heads // tp
        self.q_proj_swiftkv = ColumnParallelLinear(hidden_size, num_heads * self.head_dim, bias=bias,
                                                   quant_config=quant_config, prefix=f"{prefix}.q_proj_swiftkv")
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, hidden_size, bias=bias_o_proj,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(self.head_dim, max_position=max_position_embeddings,
                                   rope_parameters=getattr(config, "rope_parameters", None), is_neox_style=True)
        model_prefix = prefix.split(".layers.")[0]
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=num_kv_heads // tp,
                              cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn",
                              kv_sharing_target_layer_name=_writer_prefix(model_prefix, skv, skv.kv_owner(layer)) + ".attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_dep: torch.Tensor) -> torch.Tensor:
        q, _ = self.q_proj_swiftkv(hidden_states)
        q, _ = self.rotary_emb(positions, q, None)
        out = attend_shared_kv(self.attn, q, kv_dep)  # K/V: the group writer's cache, written before
        out, _ = self.o_proj(out)
        return out


class SwiftKVDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama layer with :class:`SwiftKVAttention`; ``kv_dep`` orders it after its K/V write."""

    def __init__(self, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, attn_layer_type=SwiftKVAttention)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                kv_dep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, kv_dep)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class SwiftKVWriter(nn.Module):
    """Owns one AcrossKV group's KV cache and its SingleInputKV projections; never attends."""

    def __init__(self, config, cache_config, quant_config, prefix: str, bias: bool) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.head_dim = head_dim_of(config)
        self.kv_size = config.num_key_value_heads * self.head_dim // tp
        self.kv_proj_swiftkv = MergedColumnParallelLinear(
            config.hidden_size, [config.num_key_value_heads * self.head_dim] * 2, bias=bias,
            quant_config=quant_config, prefix=f"{prefix}.kv_proj_swiftkv")
        self.rotary_emb = get_rope(self.head_dim, max_position=getattr(config, "max_position_embeddings", 8192),
                                   rope_parameters=getattr(config, "rope_parameters", None), is_neox_style=True)
        self.attn = Attention(config.num_attention_heads // tp, self.head_dim, self.head_dim**-0.5,
                              num_kv_heads=config.num_key_value_heads // tp, cache_config=cache_config,
                              quant_config=quant_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: ``norm_swiftkv`` of the residual stream entering layer l, all tokens. Returns the write's
        dependency token, which the group's layers pass to their attention (so a compiled graph keeps
        the write, and keeps it before the reads)."""
        kv, _ = self.kv_proj_swiftkv(x)
        k, v = kv.split([self.kv_size, self.kv_size], dim=-1)
        k, _ = self.rotary_emb(positions, k, None)  # RoPE on the keys only
        return write_kv_cache(self.attn, k, v)


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0},
                       enable_if=lambda c: c.cache_config.kv_sharing_fast_prefill)
class SwiftKVPrefix(nn.Module):
    """Embeddings, layers ``0..l-1`` and the SingleInputKV writes, all tokens:
    ``(h_l, *write dependency tokens)`` (returned one by one, so compilation keeps every write)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", parts: list) -> None:
        super().__init__()
        self.parts = parts  # [embed_tokens, layers 0..l-1, norm_swiftkv, writers]: owned by SwiftKVModel

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        embed, layers, norm_swiftkv, writers = self.parts
        hidden, residual = embed(input_ids), None
        for layer in layers:
            hidden, residual = layer(positions, hidden, residual)
        h_l = hidden + residual  # the residual stream entering layer l
        x = norm_swiftkv(h_l)
        return (h_l, *(w(positions, x) for w in writers))


@support_torch_compile(dynamic_arg_dims={"positions": 0, "hidden_states": 0},
                       enable_if=lambda c: c.cache_config.kv_sharing_fast_prefill)
class SwiftKVSuffix(nn.Module):
    """Layers ``l..L-1`` and the final norm, on the rows that need logits under fast prefill."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", parts: list) -> None:
        super().__init__()
        self.parts = parts  # [layers l..L-1, group index of each layer, norm]

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                kv_deps: list[torch.Tensor]) -> torch.Tensor:
        layers, groups, norm = self.parts
        hidden, residual = hidden_states, None
        for layer, g in zip(layers, groups):
            hidden, residual = layer(positions, hidden, residual, kv_deps[g])
        hidden, _ = norm(hidden, residual)
        return hidden


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0},
                       enable_if=lambda c: not c.cache_config.kv_sharing_fast_prefill)
class SwiftKVModel(nn.Module):
    """``model.*`` of a SwiftKV checkpoint (parameter names as in the checkpoint, plus the writers')."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        _prepare_hf_config(config)
        self.skv = skv = swiftkv_layout(config)
        l, tp = skv.num_key_value_layers, get_tensor_model_parallel_world_size()
        if get_pp_group().world_size > 1:
            raise ValueError("SwiftKV in vLLM supports tensor parallelism, not pipeline parallelism; "
                             "use --tensor-parallel-size instead of --pipeline-parallel-size")
        if config.num_key_value_heads % tp or config.num_attention_heads % tp:
            raise ValueError(f"tensor_parallel_size={tp} must divide the {config.num_attention_heads} attention "
                             f"heads and the {config.num_key_value_heads} KV heads of this model")
        cache, quant = vllm_config.cache_config, vllm_config.quant_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, quant_config=quant)
        # construction order matters: layers 0..l-1, then the writers, then the KV-sharing layers,
        # so the later layers are the trailing run that fast prefill restricts to the logits rows
        layers = [LlamaDecoderLayer(vllm_config=vllm_config, prefix=f"{prefix}.layers.{i}") for i in range(l)]
        self.norm_swiftkv = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        qkv_bias = bool(getattr(config, "qkv_bias", getattr(config, "attention_bias", False)))
        self.swiftkv_writers = nn.ModuleDict({
            str(skv.num_layers + j): SwiftKVWriter(config, cache, quant, _writer_prefix(prefix, skv, l + j), qkv_bias)
            for j in range(skv.num_kv_owners - l)})
        layers += [SwiftKVDecoderLayer(vllm_config, f"{prefix}.layers.{i}") for i in range(l, skv.num_layers)]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        writers = list(self.swiftkv_writers.values())
        self.fast_prefill = cache.kv_sharing_fast_prefill
        groups = [skv.kv_owner(i) - l for i in range(l, skv.num_layers)]
        self.prefix_part = SwiftKVPrefix(vllm_config=vllm_config, prefix=f"{prefix}.prefix",
                                         parts=[self.embed_tokens, layers[:l], self.norm_swiftkv, writers])
        self.suffix_part = SwiftKVSuffix(vllm_config=vllm_config, prefix=f"{prefix}.suffix",
                                         parts=[layers[l:], groups, self.norm])

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if inputs_embeds is not None:
            raise ValueError("SwiftKV models take token ids, not inputs_embeds")
        h_l, *kv_deps = self.prefix_part(input_ids, positions)
        rows = self._logits_rows() if self.fast_prefill else None
        if rows is None:  # decode-only step, dummy run, or fast prefill off: every row
            return self.suffix_part(positions, h_l, kv_deps)
        indices, n = rows
        # keep only the rows that need logits: one index_select, then the later layers on them
        out = self.suffix_part(positions.index_select(0, indices), h_l.index_select(0, indices), kv_deps)
        hidden = h_l.clone()  # rows without logits keep layer l's input; nothing reads them
        hidden[indices[:n]] = out[:n]
        return hidden

    def _logits_rows(self) -> tuple[torch.Tensor, int] | None:
        meta = get_forward_context().attn_metadata
        if not isinstance(meta, dict):
            return None
        last = meta.get(self.layers[-1].self_attn.attn.layer_name)
        if not isinstance(last, KVSharingFastPrefillMetadata) or last.logits_indices_padded is None:
            return None
        return last.logits_indices_padded, last.num_logits_indices


def _weights_mapper(skv: SwiftKVConfig) -> WeightsMapper:
    """Checkpoint names -> this model's: fused q/k/v and gate/up, per-group K/V writers, and the later
    layers' original q/k/v (the teacher, unused here) dropped."""
    l, L = skv.num_key_value_layers, skv.num_layers
    stacked = {f"layers.{i}.self_attn.{p}_proj.": (f"layers.{i}.self_attn.qkv_proj.", p)
               for i in range(l) for p in "qkv"}
    stacked |= {".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1)}
    for i in skv.group_leaders:
        writer = f"swiftkv_writers.{L + skv.kv_owner(i) - l}.kv_proj_swiftkv."
        stacked |= {f"layers.{i}.self_attn.k_proj_swiftkv.": (writer, 0),
                    f"layers.{i}.self_attn.v_proj_swiftkv.": (writer, 1)}
    dropped = {f"layers.{i}.self_attn.{p}_proj.": None for i in range(l, L) for p in "qkv"}
    return WeightsMapper(orig_to_new_substr=dropped, orig_to_new_stacked=stacked)


class SwiftKVForCausalLM(nn.Module):
    """vLLM model class of ``LlamaSwiftKVForCausalLM`` and ``Qwen2SwiftKVForCausalLM`` checkpoints."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = SwiftKVModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self)  # tied lm_head handled by the loader
        return loader.load_weights(weights, mapper=_weights_mapper(self.model.skv))
