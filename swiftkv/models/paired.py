"""Teacher and SwiftKV student of one model in one pass: layers ``0..l-1`` once, then both tails.

The teacher is the same weights with SwiftKV off (the original q/k/v of layers ``l..L-1``), so
distillation, evaluation and the least-squares K/V fit need no second model. Logits come from
:meth:`~swiftkv.models.llama.SwiftKVCausalLM.logits_at` on the rows that need them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from swiftkv.config import SwiftKVConfig
from swiftkv.layers.attention import AttentionMetadata, FullSequenceAttention


@dataclass
class PairedStates:
    """Residual streams ``[N, hidden]`` of both paths (before the final norm)."""

    h_l: torch.Tensor  # entering layer l: shared by both paths
    teacher: torch.Tensor  # after the last layer, original model
    teacher_last_input: torch.Tensor  # entering layer L-1 (for intermediate-state losses)
    swiftkv: torch.Tensor | None = None  # after the last layer, SwiftKV path
    swiftkv_last_input: torch.Tensor | None = None


def paired_forward(model, input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: list[int],
                   masks: list[torch.Tensor | None] | None = None, swiftkv: bool = True) -> PairedStates:
    """Whole sequences through the shared prefix, the teacher tail and (``swiftkv``) the SwiftKV tail.

    The prefix and the teacher run without gradients (frozen); the SwiftKV tail records them when
    autograd is on, so only its tensors train.
    """
    skv = model.swiftkv_config
    L, l = skv.num_layers, skv.num_key_value_layers
    teacher = SwiftKVConfig.baseline(L)
    split = max(l, L - 1)  # the last layer's input is kept (l == L: no tail at all)

    meta = AttentionMetadata.full(seq_lens, masks)
    with torch.no_grad():
        h, cos, sin = model.embed(input_ids, positions)
        h_l = model.run_layers(h, cos, sin, meta, FullSequenceAttention(), 0, l)
        attn = FullSequenceAttention()  # one per path: each stores its own K/V
        t_last = model.run_layers(h_l, cos, sin, meta, attn, l, split, skv=teacher)
        t = model.run_layers(t_last, cos, sin, meta, attn, split, L, skv=teacher)
    out = PairedStates(h_l, t, t_last)
    if swiftkv:
        out.swiftkv_last_input, out.swiftkv = swiftkv_tail(model, h_l, cos, sin, meta)
    return out


def swiftkv_tail(model, h_l: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """The SwiftKV path from the residual stream entering layer l (whole sequences): SingleInputKV's
    K/V, then layers ``l..L-1``. Returns ``(input of layer L-1, output of the last layer)``; autograd
    records it when on (distillation trains these layers' SwiftKV tensors)."""
    skv = model.swiftkv_config
    L, l = skv.num_layers, skv.num_key_value_layers
    split, attn = max(l, L - 1), FullSequenceAttention()
    if l < L:
        model.store_swiftkv(h_l, cos, sin, meta, attn)
    last_input = model.run_layers(h_l, cos, sin, meta, attn, l, split, swiftkv=True, skv=skv)
    return last_input, model.run_layers(last_input, cos, sin, meta, attn, split, L, swiftkv=True, skv=skv)


def distribution_gap(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of KL(teacher || student) at temperature T, times T^2; number of rows whose top-1 agrees)``."""
    T = temperature
    kl = F.kl_div(F.log_softmax(student_logits / T, -1), F.log_softmax(teacher_logits / T, -1), log_target=True,
                  reduction="sum") * T * T
    return kl, (student_logits.argmax(-1) == teacher_logits.argmax(-1)).sum().float()
