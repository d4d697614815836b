"""Cache-free, full-sequence helpers: logits of token lists and greedy decoding, on either path
(``swiftkv=True`` / ``False``; None: the checkpoint's own).

Slow but obviously correct: the reference the engine's greedy output is tested against, and the
engine's prompt logprobs (every prompt token's logits, which the SwiftKV prefill skip does not keep).
Distillation and evaluation score through :mod:`swiftkv.models.paired` instead (one shared prefix, both
tails).
"""

from __future__ import annotations

import torch

from swiftkv.layers.attention import AttentionMetadata
from swiftkv.models.llama import LlamaForCausalLM


def _device(model: LlamaForCausalLM) -> torch.device:
    return model.compute_device


@torch.no_grad()
def full_logits(model: LlamaForCausalLM, seqs: list[list[int]], swiftkv: bool | None = None) -> list[torch.Tensor]:
    """Logits ``[len(seq), vocab]`` (fp32) for every token of every sequence, in one forward (``swiftkv``: the
    path, None the model's default)."""
    dev = _device(model)
    ids = torch.tensor([t for s in seqs for t in s], device=dev)
    positions = torch.cat([torch.arange(len(s), device=dev) for s in seqs])
    hidden = model(ids, positions, AttentionMetadata.full([len(s) for s in seqs]), swiftkv=swiftkv)
    return list(model.compute_logits(hidden).float().split([len(s) for s in seqs]))


@torch.no_grad()
def greedy_generate(
    model: LlamaForCausalLM, prompt: list[int], max_new_tokens: int, stop_ids: set[int] | None = None,
    swiftkv: bool | None = None,
) -> list[int]:
    """Greedy continuation of ``prompt``, recomputing the whole sequence each step."""
    if not prompt:
        raise ValueError("prompt must contain at least one token")
    dev = _device(model)
    seq = list(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        ids = torch.tensor(seq, device=dev)
        hidden = model(ids, torch.arange(len(seq), device=dev), AttentionMetadata.full([len(seq)], logits_seq_ids=[0]),
                       swiftkv=swiftkv)
        tok = int(model.compute_logits(hidden)[0].argmax())
        out.append(tok)
        seq.append(tok)
        if stop_ids and tok in stop_ids:
            break
    return out
