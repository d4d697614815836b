"""THE model definition: Llama family (Llama 2/3, SmolLM2, Mistral-style, Qwen2 biases).

One module serves the teacher (original q/k/v in every layer), the SwiftKV student and the
engine. Tokens are flat: ``input_ids [N]``, ``positions [N]`` and an
:class:`~swiftkv.layers.attention.AttentionMetadata` describing which sequence each token
belongs to. Parameter names equal transformers' (``model.layers.{i}.self_attn.q_proj.weight``)
plus SwiftKV's (``q_proj_swiftkv``, ``k/v_proj_swiftkv``, ``model.norm_swiftkv``) and, when the
config sets ``swiftkv_adapter_rank > 0``, low-rank adapters on the later layers' ``o_proj`` and MLP
(``self_attn.o_adapter_swiftkv``, ``mlp_adapter_swiftkv``) that only the SwiftKV path uses.
"""

from __future__ import annotations

import torch
from torch import nn

from swiftkv.config import SwiftKVConfig
from swiftkv.layers.activation import ActAndMul
from swiftkv.layers.adapter import LowRankAdapter
from swiftkv.layers.attention import (
    AttentionBackend,
    AttentionMetadata,
    FullSequenceAttention,
)
from swiftkv.layers.fused_decode import DecodeLayerSpec, FusedDecodeSpec, StoreKVSpec
from swiftkv.layers.linear import Linear, VocabEmbedding, gated_silu, hold_weights
from swiftkv.layers.norm import RMSNorm
from swiftkv.layers.rotary import RotaryEmbedding, apply_rotary_
from swiftkv.models.arch import (
    adapter_rank_of,
    attention_biases,
    check_supported,
    head_dim_of,
    swiftkv_config_of,
)


class LlamaMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, bool(getattr(config, "mlp_bias", False))
        self.gate_proj = Linear(h, i, bias=bias)
        self.up_proj = Linear(h, i, bias=bias)
        self.down_proj = Linear(i, h, bias=bias)
        self.act_fn = ActAndMul(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_fn.is_silu and (act := gated_silu(self.gate_proj, self.up_proj, x)) is not None:
            return self.down_proj(act)  # prefill on CPU: the SiLU and the product in the matmuls' epilogues
        return self.down_proj(self.act_fn(self.gate_proj(x), self.up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, config, layer: int, skv: SwiftKVConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        h, q_out, kv_out = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv_bias, o_bias = attention_biases(config)
        self.q_proj = Linear(h, q_out, bias=qkv_bias)
        self.k_proj = Linear(h, kv_out, bias=qkv_bias)
        self.v_proj = Linear(h, kv_out, bias=qkv_bias)
        self.o_proj = Linear(q_out, h, bias=o_bias)
        if skv.is_swiftkv_layer(layer):
            self.q_proj_swiftkv = Linear(h, q_out, bias=qkv_bias)
            if skv.is_group_leader(layer):
                self.k_proj_swiftkv = Linear(h, kv_out, bias=qkv_bias)
                self.v_proj_swiftkv = Linear(h, kv_out, bias=qkv_bias)
        rank = adapter_rank_of(config) if skv.is_swiftkv_layer(layer) else 0
        self.o_adapter_swiftkv = LowRankAdapter(q_out, h, rank) if rank else None

    def forward(self, x, cos, sin, meta: AttentionMetadata, attn: AttentionBackend, owner: int,
                swiftkv: bool) -> torch.Tensor:
        n, H, Hkv, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if swiftkv:  # K/V of this owner were stored from the SingleInputKV projections
            q = apply_rotary_(self.q_proj_swiftkv(x).view(n, H, D), cos, sin)
        else:
            q = apply_rotary_(self.q_proj(x).view(n, H, D), cos, sin)  # [N, H, D]
            k = apply_rotary_(self.k_proj(x).view(n, Hkv, D), cos, sin)  # [N, Hkv, D]
            attn.store(owner, k, self.v_proj(x).view(n, Hkv, D), meta)
        out = attn.attend(owner, q, meta).reshape(n, -1)  # [N, H, D] -> [N, H*D]
        if swiftkv and self.o_adapter_swiftkv is not None:
            return self.o_proj(out) + self.o_adapter_swiftkv(out)
        return self.o_proj(out)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer: int, skv: SwiftKVConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer, skv)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        rank = adapter_rank_of(config) if skv.is_swiftkv_layer(layer) else 0
        self.mlp_adapter_swiftkv = LowRankAdapter(config.hidden_size, config.hidden_size, rank) if rank else None

    def decode_spec(self) -> DecodeLayerSpec | None:
        """This layer for the fused decode (:mod:`swiftkv.layers.fused_decode`), or None where it cannot run
        there (SwiftKV adapters, an activation other than SiLU)."""
        attn, mlp = self.self_attn, self.mlp
        if not mlp.act_fn.is_silu or self.mlp_adapter_swiftkv is not None or attn.o_adapter_swiftkv is not None:
            return None
        return DecodeLayerSpec(self.input_layernorm.weight, self.post_attention_layernorm.weight,
                               float(self.input_layernorm.eps), attn.q_proj, attn.k_proj, attn.v_proj,
                               getattr(attn, "q_proj_swiftkv", None), attn.o_proj, mlp.gate_proj, mlp.up_proj,
                               mlp.down_proj)

    def forward(self, h, cos, sin, meta, attn, owner: int, swiftkv: bool) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, meta, attn, owner, swiftkv)
        x = self.post_attention_layernorm(h)
        if swiftkv and self.mlp_adapter_swiftkv is not None:  # parallel adapter beside the MLP
            return h + self.mlp(x) + self.mlp_adapter_swiftkv(x)
        return h + self.mlp(x)


class LlamaModel(nn.Module):
    def __init__(self, config, skv: SwiftKVConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, skv) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not skv.is_baseline:
            self.norm_swiftkv = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class SwiftKVCausalLM:
    """The causal LM's behaviour, without the module base class: mixed into
    :class:`LlamaForCausalLM` (``nn.Module``) and the transformers wrapper (``PreTrainedModel``,
    ``models/hf.py``), so every method added here reaches both.

    ``swiftkv_config`` is the checkpoint's layout (baseline when the model is not SwiftKV). Which path a
    forward runs -- the SwiftKV student or the original teacher, of one set of weights -- is its ``swiftkv``
    argument, never state of the model, so two callers sharing a model (two engines, an engine and an
    evaluation) never disagree; a caller that does not say gets the checkpoint's own mode
    (:attr:`default_swiftkv`).
    """

    def _build(self, config) -> None:
        """Create the modules (after the module base class's ``__init__``)."""
        check_supported(config)
        self.config = config
        self.swiftkv_config = swiftkv_config_of(config)
        self.teacher_available = True  # False when a checkpoint lacks the later layers' q/k/v
        self.model = LlamaModel(config, self.swiftkv_config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.inference_dtype: torch.dtype | None = None  # set by prepare_for_inference()
        self.tie_lm_head()

    def tie_lm_head(self) -> None:
        """Make the LM head's weight the embedding's where the config ties them (again, after anything that
        replaced either parameter: ``to_empty``, an assigning load)."""
        if getattr(self.config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def default_swiftkv(self) -> bool:
        """The path of a caller that does not choose one: SwiftKV where the checkpoint has SwiftKV layers."""
        return not self.swiftkv_config.is_baseline

    def layout(self, swiftkv: bool | None = None) -> SwiftKVConfig:
        """The layout a forward with ``swiftkv`` runs (None: the default): the checkpoint's, or the original
        model's (every layer owns its KV). Raises ``ValueError`` for a path the checkpoint cannot run."""
        swiftkv = self.default_swiftkv if swiftkv is None else swiftkv
        self.check_path(swiftkv)
        return self.swiftkv_config if swiftkv else SwiftKVConfig.baseline(self.config.num_hidden_layers)

    def check_path(self, enabled: bool) -> None:
        """Raise ``ValueError`` if this checkpoint cannot run that path."""
        if enabled and self.swiftkv_config.is_baseline:
            raise ValueError("This model has no SwiftKV layers; convert it first (swiftkv convert).")
        if not enabled and not self.teacher_available:
            l = self.swiftkv_config.num_key_value_layers
            raise ValueError(f"This SwiftKV checkpoint has no original q/k/v for layers >= {l}, so the original model "
                             "cannot be run; load a checkpoint that keeps the teacher tensors.")

    # -- forward pieces (reused by distillation; run_layers + store_swiftkv + run_all_layers: the eager layer
    # executor) --

    def run_layers(self, h, cos, sin, meta: AttentionMetadata, attn: AttentionBackend, start: int, end: int,
                   swiftkv: bool = False, skv: SwiftKVConfig | None = None) -> torch.Tensor:
        """Layers ``start..end-1`` of layout ``skv`` (default: the default path's; distillation runs both)."""
        skv = skv or self.layout()
        for i in range(start, end):
            h = self.model.layers[i](h, cos, sin, meta, attn, skv.kv_owner(i), swiftkv and skv.is_swiftkv_layer(i))
        return h

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Embeddings and RoPE tables: ``(h, cos, sin)``. With layers ``0..l-1`` (:meth:`run_layers`) this is
        identical for teacher and SwiftKV, so distillation and evaluation compute it once."""
        h = self.model.embed_tokens(input_ids)
        return (h, *self.model.rotary_emb(positions, h.dtype))

    def store_swiftkv(self, h_l: torch.Tensor, cos, sin, meta: AttentionMetadata, attn: AttentionBackend) -> None:
        """SingleInputKV: K/V of every later KV owner from the residual stream entering layer l."""
        skv, n = self.swiftkv_config, h_l.shape[0]
        x = self.model.norm_swiftkv(h_l)
        for i in skv.group_leaders:
            a = self.model.layers[i].self_attn
            k = a.k_proj_swiftkv(x).view(n, a.num_kv_heads, a.head_dim)  # [N, Hkv, D]
            v = a.v_proj_swiftkv(x).view(n, a.num_kv_heads, a.head_dim)
            attn.store(skv.kv_owner(i), apply_rotary_(k, cos, sin), v, meta)

    def run_all_layers(self, h, cos, sin, meta: AttentionMetadata, attn: AttentionBackend,
                       skv: SwiftKVConfig) -> torch.Tensor:
        """Every layer of layout ``skv`` on every token, SingleInputKV's store (a SwiftKV layout) between layers
        l-1 and l."""
        l, L = skv.num_key_value_layers, skv.num_layers
        h = self.run_layers(h, cos, sin, meta, attn, 0, l, swiftkv=True, skv=skv)  # (none of 0..l-1 is SwiftKV's)
        if l < L:
            self.store_swiftkv(h, cos, sin, meta, attn)
        return self.run_layers(h, cos, sin, meta, attn, l, L, swiftkv=True, skv=skv)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                attn: AttentionBackend | None = None, swiftkv: bool | None = None, executor=None) -> torch.Tensor:
        """Return final-normed hidden states ``[M, hidden]``: of every token, or where ``meta.logits_seq_ids``
        lists sequences, of their last tokens only (and in SwiftKV mode only those run layers ``l..L-1``).

        ``attn``: the attention backend (default: a :class:`~swiftkv.layers.attention.FullSequenceAttention`);
        ``swiftkv``: the SwiftKV path or the original model's (None: :attr:`default_swiftkv`); ``executor``: what
        runs the layers (default: this model, eagerly; the engine passes its fused decoder for decode steps).
        """
        attn = attn or FullSequenceAttention()
        run = executor or self
        L, skv = self.config.num_hidden_layers, self.layout(swiftkv)
        l = skv.num_key_value_layers
        h, cos, sin = self.embed(input_ids, positions)
        if not meta.needs_selection:  # every token through every layer: the executor's one call
            return self.model.norm(run.run_all_layers(h, cos, sin, meta, attn, skv))
        h = run.run_layers(h, cos, sin, meta, attn, 0, l, swiftkv=True, skv=skv)  # (none of 0..l-1 is SwiftKV's)
        if l < L:
            run.store_swiftkv(h, cos, sin, meta, attn)
        if meta.needs_selection:  # keep only the tokens that need logits: one index_select
            idx = meta.logits_indices.to(h.device)
            h, cos, sin = h.index_select(0, idx), cos.index_select(0, idx), sin.index_select(0, idx)
            meta = meta.select_last()
            if not meta.num_seqs:  # e.g. only partial prompt chunks: no token needs logits
                return self.model.norm(h)
        h = run.run_layers(h, cos, sin, meta, attn, l, L, swiftkv=True, skv=skv)
        return self.model.norm(h)

    # -- inference ------------------------------------------------------------------------------

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations (and the KV cache) are computed in."""
        return self.inference_dtype or self.model.norm.weight.dtype

    @property
    def compute_device(self) -> torch.device:
        return self.model.norm.weight.device

    def prepare_for_inference(self, dtype: torch.dtype | None = None) -> None:
        """Hold every weight once, in its stored form, for inference computing in ``dtype`` (default: the
        current one): each projection and the embedding get a :class:`~swiftkv.layers.weights.HeldWeight`
        (memory-mapped checkpoint bytes where those are the held form; a tied LM head shares the
        embedding's), norms and biases move to ``dtype``. Called once when a model is loaded for inference
        (:func:`swiftkv.models.loader.load_model`; an engine refuses a model that is not); the model is
        inference-only afterwards and its weights must not change."""
        dtype = dtype or self.compute_dtype
        if self.inference_dtype is not None:
            if dtype != self.inference_dtype:
                raise ValueError(f"the model is prepared for {self.inference_dtype}; load it again for {dtype}")
            return
        hold_weights(self, self.model.embed_tokens, self.lm_head, dtype)
        self.inference_dtype = dtype

    def fused_decode_spec(self) -> FusedDecodeSpec:
        """This model for the engine's fused decode: shapes, each layer's description, SingleInputKV's store."""
        c, skv, layers = self.config, self.swiftkv_config, self.model.layers
        attns = [layers[i].self_attn for i in skv.group_leaders]
        store = None if skv.is_baseline else StoreKVSpec(
            self.model.norm_swiftkv.weight, float(self.model.norm_swiftkv.eps),
            [(a.k_proj_swiftkv, a.v_proj_swiftkv) for a in attns], [skv.kv_owner(i) for i in skv.group_leaders])
        dims = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, head_dim_of(c), c.intermediate_size
        return FusedDecodeSpec(dims, [layer.decode_spec() for layer in layers], store, skv)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of final-normed hidden states (what :meth:`forward` returns)."""
        return self.lm_head(hidden)

    def logits_at(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Logits ``[len(rows), vocab]`` of the residual stream ``hidden`` (before the final norm,
        e.g. from :func:`swiftkv.models.paired.paired_forward`) at flat token rows ``rows``."""
        return self.lm_head(self.model.norm(hidden.index_select(0, rows)))


class LlamaForCausalLM(SwiftKVCausalLM, nn.Module):
    """Llama-family causal LM with an optional SwiftKV path (see :class:`SwiftKVCausalLM`)."""

    def __init__(self, config) -> None:
        nn.Module.__init__(self)
        self._build(config)
