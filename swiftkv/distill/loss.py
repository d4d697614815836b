"""Distillation loss: KL(teacher || SwiftKV) at temperature T over assistant tokens (plus an optional
MSE on the last layer's input), from one :func:`~swiftkv.models.paired.paired_forward`, or from the
SwiftKV path alone when the batch carries cached frozen-model features (:mod:`swiftkv.distill.features`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from swiftkv.data.rows import Batch
from swiftkv.layers.attention import AttentionMetadata
from swiftkv.models.llama import LlamaForCausalLM
from swiftkv.models.paired import distribution_gap, paired_forward, swiftkv_tail


class DistillModule(nn.Module):
    """Wraps the model so DDP/FSDP see one ``forward(batch) -> losses`` over its trainable tensors."""

    def __init__(self, model: LlamaForCausalLM, temperature: float = 2.0, mse_weight: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.mse_weight = mse_weight

    def forward(self, batch: Batch, loss_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Sums over this batch's loss tokens times ``loss_scale`` (1 / global loss tokens)."""
        m = self.model
        idx = batch.loss_mask.nonzero().squeeze(1)
        if batch.h_l is not None:  # frozen-model features from a FeatureCache: only the SwiftKV path runs
            if self.mse_weight:
                raise ValueError("the hidden-state MSE needs the teacher's layer states: train without a feature cache")
            dtype = m.compute_dtype  # what the uncached path's residual stream has
            h_l, teacher = batch.h_l.to(dtype), batch.teacher_hidden.to(dtype)
            cos, sin = m.model.rotary_emb(batch.positions, dtype)
            _, student = swiftkv_tail(m, h_l, cos, sin, AttentionMetadata.full(batch.seq_lens))
            with torch.no_grad():
                t_logits = m.compute_logits(m.model.norm(teacher)).float()  # every cached row is a loss row
        else:
            states = paired_forward(m, batch.input_ids, batch.positions, batch.seq_lens)
            student = states.swiftkv
            with torch.no_grad():
                t_logits = m.logits_at(states.teacher, idx).float()
        s_logits = m.logits_at(student, idx).float()
        kl, agree = distribution_gap(t_logits, s_logits, self.temperature)
        loss = kl
        out = {"kl": kl.detach() * loss_scale}
        if self.mse_weight:
            mse = F.mse_loss(states.swiftkv_last_input.index_select(0, idx).float(),
                             states.teacher_last_input.index_select(0, idx).float(), reduction="none").mean(-1).sum()
            loss = loss + self.mse_weight * mse
            out["mse"] = mse.detach() * loss_scale
        out["loss"] = loss * loss_scale
        out["agree"] = agree * loss_scale
        return out


def trainable_parameters(model: LlamaForCausalLM) -> dict[str, nn.Parameter]:
    """Only SwiftKV tensors train: q_proj_swiftkv, leaders' k/v_proj_swiftkv, norm_swiftkv, and the
    optional ``*_adapter_swiftkv`` low-rank adapters."""
    return {n: p for n, p in model.named_parameters() if "_swiftkv" in n}
