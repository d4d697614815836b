"""Distillation forward: the first ``l`` layers once for teacher and student, then both tails.

Teacher = the same weights with SwiftKV off (no second copy of the frozen weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swiftkv.config import SwiftKVConfig
from swiftkv.distill.data import Row
from swiftkv.layers.attention import AttentionMetadata
from swiftkv.models.llama import LlamaForCausalLM


@dataclass
class Batch:
    input_ids: torch.Tensor  # [N] flat tokens of all conversations of all rows
    positions: torch.Tensor  # [N]
    seq_lens: list[int]  # one entry per conversation
    loss_mask: torch.Tensor  # [N] bool: assistant tokens whose next token is predicted

    @classmethod
    def from_rows(cls, rows: list[Row]) -> Batch:
        ids, pos, mask, lens = [], [], [], []
        for row in rows:
            for toks, m in row.docs:
                ids += toks
                pos += range(len(toks))
                # position t predicts token t+1: a loss on t when token t+1 is an assistant token
                mask += [m[t + 1] if t + 1 < len(toks) else False for t in range(len(toks))]
                lens.append(len(toks))
        return cls(torch.tensor(ids), torch.tensor(pos), lens, torch.tensor(mask))

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


class DistillModule(nn.Module):
    """Wraps the model so DDP/FSDP see one ``forward(batch) -> losses`` over its trainable tensors."""

    def __init__(self, model: LlamaForCausalLM, temperature: float = 2.0, mse_weight: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.mse_weight = mse_weight

    def forward(self, batch: Batch, loss_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Sums over this batch's loss tokens times ``loss_scale`` (1 / global loss tokens)."""
        m, skv = self.model, self.model.swiftkv_config
        L, l, T = skv.num_layers, skv.num_key_value_layers, self.temperature
        teacher_skv = SwiftKVConfig.baseline(L)
        with torch.no_grad():
            h_l, cos, sin = m.embed_prefix(batch.input_ids, batch.positions, AttentionMetadata.full(batch.seq_lens), l)
            meta_t = AttentionMetadata.full(batch.seq_lens)
            h_t_last = m.run_layers(h_l, cos, sin, meta_t, l, L - 1, skv=teacher_skv)  # input of the last layer
            h_t = m.run_layers(h_t_last, cos, sin, meta_t, L - 1, L, skv=teacher_skv)
            idx = batch.loss_mask.nonzero().squeeze(1)
            t_logits = m.compute_logits(m.model.norm(h_t.index_select(0, idx))).float()
        meta_s = AttentionMetadata.full(batch.seq_lens)
        if l < L:
            m.store_swiftkv(h_l, cos, sin, meta_s)
        h_s_last = m.run_layers(h_l, cos, sin, meta_s, l, L - 1, swiftkv=True, skv=skv)
        h_s = m.run_layers(h_s_last, cos, sin, meta_s, L - 1, L, swiftkv=True, skv=skv)
        s_logits = m.compute_logits(m.model.norm(h_s.index_select(0, idx))).float()
        kl = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True,
                      reduction="sum") * T * T
        loss = kl
        out = {"kl": kl.detach() * loss_scale}
        if self.mse_weight:
            mse = F.mse_loss(h_s_last.index_select(0, idx).float(), h_t_last.index_select(0, idx).float(),
                             reduction="none").mean(-1).sum()
            loss = loss + self.mse_weight * mse
            out["mse"] = mse.detach() * loss_scale
        out["loss"] = loss * loss_scale
        out["agree"] = (s_logits.argmax(-1) == t_logits.argmax(-1)).sum().float() * loss_scale
        return out


def trainable_parameters(model: LlamaForCausalLM) -> dict[str, nn.Parameter]:
    """Only SwiftKV tensors train: q_proj_swiftkv, leaders' k/v_proj_swiftkv, norm_swiftkv, and the
    optional ``*_adapter_swiftkv`` low-rank adapters."""
    return {n: p for n, p in model.named_parameters() if "_swiftkv" in n}
