"""Token sampling: penalties, greedy, temperature, top-k, top-p, per-request seeds, logprobs."""

from __future__ import annotations

import torch

from swiftkv.sampling_params import SamplingParams


class Sampler:
    """Samples one token per row of logits. Greedy rows are batched; others use their generator."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> tuple[list[int], list[tuple[float, dict[int, float]] | None]]:
        """logits [M, vocab] -> (token ids, per-row (chosen logprob, top-k logprobs) or None)."""
        logits = logits.float()
        tokens = logits.argmax(-1).tolist()
        for r, p in enumerate(params):
            if not p.greedy:
                tokens[r] = _sample_row(logits[r], p, generators[r])
        logprobs: list[tuple[float, dict[int, float]] | None] = [None] * len(params)
        rows = [r for r, p in enumerate(params) if p.logprobs is not None]
        if rows:
            lp = torch.log_softmax(logits[rows], -1)
            for j, r in enumerate(rows):
                k = params[r].logprobs
                top = lp[j].topk(k) if k else None
                alts = dict(zip(top.indices.tolist(), top.values.tolist())) if top is not None else {}
                logprobs[r] = (float(lp[j, tokens[r]]), alts)
        return tokens, logprobs


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
                    outputs: list[list[int]]) -> None:
    """Repetition, frequency and presence penalties, in place, on the rows whose params set one (vLLM's
    formulas: repetition over prompt and output tokens, frequency and presence over output tokens)."""
    vocab = logits.shape[-1]
    for r, p in enumerate(params):
        if not p.has_penalties:
            continue
        out = torch.tensor([t for t in outputs[r] if 0 <= t < vocab], dtype=torch.long, device=logits.device)
        counts = torch.bincount(out, minlength=vocab).to(logits.dtype)  # [vocab] times generated
        row = logits[r]
        if p.repetition_penalty != 1:
            seen = counts > 0
            seen[[t for t in prompts[r] if 0 <= t < vocab]] = True
            row = torch.where(seen, torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty), row)
        logits[r] = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    x = logits / p.temperature
    if p.top_k and p.top_k < x.shape[-1]:
        kth = x.topk(p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, idx = x.sort(descending=True)
        probs = sorted_x.softmax(-1)
        # drop tokens once the mass before them already reaches top_p (always keep the first)
        drop = probs.cumsum(-1) - probs >= p.top_p
        x = x.scatter(0, idx, sorted_x.masked_fill(drop, float("-inf")))
    probs = x.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=gen))
