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
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from swiftkv.config import SwiftKVConfig
from swiftkv.layers import cpu_ops
from swiftkv.layers.adapter import LowRankAdapter
from swiftkv.layers.attention import AttentionMetadata
from swiftkv.layers.fused_decode import FusedDecoder
from swiftkv.layers.linear import (
    InferenceLinear,
    fuse_linears,
    route_through_inference_linear,
)
from swiftkv.layers.norm import RMSNorm
from swiftkv.layers.rotary import RotaryEmbedding, apply_rotary_
from swiftkv.models.arch import (
    adapter_rank_of,
    attention_biases,
    check_supported,
    swiftkv_config_of,
)


class LlamaMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, bool(getattr(config, "mlp_bias", False))
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act = F.silu if config.hidden_act == "silu" else ACT2FN[config.hidden_act]

        self.gate_up: InferenceLinear | None = None  # see fuse()

    def fuse(self) -> None:
        """Inference: one matmul for gate+up (the parameters become views of the fused weight)."""
        self.gate_up = InferenceLinear(*fuse_linears(self.gate_proj, self.up_proj))
        route_through_inference_linear(self.down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate_up = self.gate_up(x)
            if self.act is F.silu and (act := cpu_ops.silu_and_mul(gate_up)) is not None:  # inference on CPU
                return self.down_proj(act)
            gate, up = gate_up.chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaAttention(nn.Module):
    def __init__(self, config, layer: int, skv: SwiftKVConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        h, q_out, kv_out = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv_bias, o_bias = attention_biases(config)
        self.q_proj = nn.Linear(h, q_out, bias=qkv_bias)
        self.k_proj = nn.Linear(h, kv_out, bias=qkv_bias)
        self.v_proj = nn.Linear(h, kv_out, bias=qkv_bias)
        self.o_proj = nn.Linear(q_out, h, bias=o_bias)
        self.qkv: InferenceLinear | None = None  # see fuse()
        if skv.is_swiftkv_layer(layer):
            self.q_proj_swiftkv = nn.Linear(h, q_out, bias=qkv_bias)
            if skv.is_group_leader(layer):
                self.k_proj_swiftkv = nn.Linear(h, kv_out, bias=qkv_bias)
                self.v_proj_swiftkv = nn.Linear(h, kv_out, bias=qkv_bias)
        rank = adapter_rank_of(config) if skv.is_swiftkv_layer(layer) else 0
        self.o_adapter_swiftkv = LowRankAdapter(q_out, h, rank) if rank else None

    def fuse(self) -> None:
        """Inference: one matmul for q/k/v (the parameters become views of the fused weight), and
        every projection through :class:`~swiftkv.layers.linear.InferenceLinear`."""
        if self.q_proj is not None:
            self.qkv = InferenceLinear(*fuse_linears(self.q_proj, self.k_proj, self.v_proj))
        for name in ("o_proj", "q_proj_swiftkv", "k_proj_swiftkv", "v_proj_swiftkv"):
            if getattr(self, name, None) is not None:
                route_through_inference_linear(getattr(self, name))

    def forward(self, x, cos, sin, meta: AttentionMetadata, owner: int, swiftkv: bool) -> torch.Tensor:
        n, H, Hkv, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if swiftkv:  # K/V of this owner were stored from the SingleInputKV projections
            q = apply_rotary_(self.q_proj_swiftkv(x).view(n, H, D), cos, sin)
        else:
            if self.qkv is not None:
                qkv = self.qkv(x).view(n, H + 2 * Hkv, D)
            else:
                qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1).view(n, H + 2 * Hkv, D)
            qk = apply_rotary_(qkv[:, : H + Hkv], cos, sin)  # rotate q and k heads together
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv :]  # [N, H, D], [N, Hkv, D], [N, Hkv, D]
            meta.store(owner, k, v)
        out = meta.attend(owner, q).reshape(n, -1)  # [N, H, D] -> [N, H*D]
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

    def forward(self, h, cos, sin, meta, owner: int, swiftkv: bool) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, meta, owner, swiftkv)
        x = self.post_attention_layernorm(h)
        if swiftkv and self.mlp_adapter_swiftkv is not None:  # parallel adapter beside the MLP
            return h + self.mlp(x) + self.mlp_adapter_swiftkv(x)
        return h + self.mlp(x)


class LlamaModel(nn.Module):
    def __init__(self, config, skv: SwiftKVConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, skv) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not skv.is_baseline:
            self.norm_swiftkv = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class SwiftKVCausalLM:
    """The causal LM's behaviour, without the module base class: mixed into
    :class:`LlamaForCausalLM` (``nn.Module``) and the transformers wrapper (``PreTrainedModel``,
    ``models/hf.py``), so every method added here reaches both.

    ``swiftkv_config`` is the checkpoint's layout (baseline when the model is not SwiftKV);
    ``swiftkv_enabled`` switches between the SwiftKV student and the original teacher.
    """

    def _build(self, config) -> None:
        """Create the modules (after the module base class's ``__init__``)."""
        check_supported(config)
        self.config = config
        self.swiftkv_config = swiftkv_config_of(config)
        self.swiftkv_enabled = not self.swiftkv_config.is_baseline
        self.teacher_available = True  # False when a checkpoint lacks the later layers' q/k/v
        self.model = LlamaModel(config, self.swiftkv_config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def active_config(self) -> SwiftKVConfig:
        """The layout the forward pass uses now (baseline when SwiftKV is switched off)."""
        if self.swiftkv_enabled:
            return self.swiftkv_config
        return SwiftKVConfig.baseline(self.config.num_hidden_layers)

    def set_swiftkv(self, enabled: bool) -> None:
        """Switch between the SwiftKV path (student) and the original model (teacher)."""
        if enabled and self.swiftkv_config.is_baseline:
            raise ValueError("This model has no SwiftKV layers; convert it first (swiftkv convert).")
        if not enabled and not self.teacher_available:
            raise ValueError(
                "This SwiftKV checkpoint has no original q/k/v for layers >= "
                f"{self.swiftkv_config.num_key_value_layers}, so the original model cannot be run; "
                "load a checkpoint that keeps the teacher tensors."
            )
        self.swiftkv_enabled = enabled

    # -- forward pieces (reused by distillation) ----------------------------------------------

    def run_layers(self, h, cos, sin, meta, start: int, end: int, swiftkv: bool = False,
                   skv: SwiftKVConfig | None = None) -> torch.Tensor:
        """Layers ``start..end-1``; ``skv`` overrides the active layout (distillation runs both)."""
        skv = skv or self.active_config
        fused = getattr(self, "fused_decoder", None)  # decode steps: the layers in one native call
        if fused is not None and (out := fused.run(h, cos, sin, meta, skv, start, end, swiftkv)) is not None:
            return out
        for i in range(start, end):
            owner = skv.kv_owner(i)
            h = self.model.layers[i](h, cos, sin, meta, owner, swiftkv and skv.is_swiftkv_layer(i))
        return h

    def embed_prefix(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                     end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings, RoPE tables and layers ``0..end-1``: ``(h, cos, sin)``. For ``end <= l`` this
        is identical for teacher and SwiftKV, so distillation and evaluation compute it once."""
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions, h.dtype)
        return self.run_layers(h, cos, sin, meta, 0, end), cos, sin

    def store_swiftkv(self, h_l: torch.Tensor, cos, sin, meta: AttentionMetadata) -> None:
        """SingleInputKV: K/V of every later KV owner from the residual stream entering layer l."""
        fused_decoder = getattr(self, "fused_decoder", None)  # decode steps: in one native call
        if fused_decoder is not None and fused_decoder.store_swiftkv(h_l, cos, sin, meta):
            return
        skv, n = self.swiftkv_config, h_l.shape[0]
        x = self.model.norm_swiftkv(h_l)
        fused = getattr(self.model, "kv_proj_swiftkv_fused", None)
        if fused is not None:  # inference: every leader's K and V in one matmul (they share the input)
            attn = self.model.layers[skv.num_key_value_layers].self_attn
            kv = fused(x).view(n, -1, 2, attn.num_kv_heads, attn.head_dim)  # [N, leaders, K/V, Hkv, D]
            for j, i in enumerate(skv.group_leaders):
                meta.store(skv.kv_owner(i), apply_rotary_(kv[:, j, 0], cos, sin), kv[:, j, 1])
            return
        for i in skv.group_leaders:
            attn = self.model.layers[i].self_attn
            k = attn.k_proj_swiftkv(x).view(n, attn.num_kv_heads, attn.head_dim)  # [N, Hkv, D]
            v = attn.v_proj_swiftkv(x).view(n, attn.num_kv_heads, attn.head_dim)
            meta.store(skv.kv_owner(i), apply_rotary_(k, cos, sin), v)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        logits_seq_ids: list[int] | None = None,
    ) -> torch.Tensor:
        """Return final-normed hidden states ``[M, hidden]``.

        ``logits_seq_ids`` lists the sequences whose last token needs logits; only those tokens
        are returned (and, in SwiftKV mode, only they run layers ``l..L-1``). ``None`` returns
        every token (full-sequence mode).
        """
        L = self.config.num_hidden_layers
        l = self.active_config.num_key_value_layers
        h, cos, sin = self.embed_prefix(input_ids, positions, meta, l)
        if self.swiftkv_enabled:
            self.store_swiftkv(h, cos, sin, meta)
        every_token = h.shape[0] == meta.num_seqs and logits_seq_ids == list(range(h.shape[0]))  # decode
        if logits_seq_ids is not None and not every_token:
            # keep only the tokens that need logits: the last token of each listed sequence
            ends = torch.tensor(meta.q_lens, device=h.device).cumsum(0) - 1
            idx = ends[logits_seq_ids]
            h, cos, sin = h.index_select(0, idx), cos.index_select(0, idx), sin.index_select(0, idx)
            meta = meta.select_last(logits_seq_ids)
            if not logits_seq_ids:  # e.g. only partial prompt chunks: no token needs logits
                return self.model.norm(h)
        h = self.run_layers(h, cos, sin, meta, l, L, swiftkv=True)
        return self.model.norm(h)

    def fuse_for_inference(self) -> None:
        """Inference only (the engine calls it; weights must not change afterwards): fuse q/k/v and
        gate/up, run every projection and the LM head through oneDNN-prepacked weights on CPU
        (:mod:`swiftkv.layers.linear`), and decode steps' layers in one native call where they can
        (:mod:`swiftkv.layers.fused_decode`). Call after ``.to(dtype)``."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        route_through_inference_linear(self.lm_head)
        if not self.swiftkv_config.is_baseline:  # [k_0; v_0; k_1; v_1; ...] of the group leaders
            attns = [self.model.layers[i].self_attn for i in self.swiftkv_config.group_leaders]
            weight = torch.cat([p.weight.detach() for a in attns for p in (a.k_proj_swiftkv, a.v_proj_swiftkv)])
            has_bias = attns[0].k_proj_swiftkv.bias is not None
            bias = torch.cat([p.bias.detach() for a in attns for p in (a.k_proj_swiftkv, a.v_proj_swiftkv)]) \
                if has_bias else None
            self.model.kv_proj_swiftkv_fused = InferenceLinear(weight, bias)
        self.fused_decoder = FusedDecoder.build(self)

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
