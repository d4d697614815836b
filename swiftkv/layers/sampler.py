"""Token sampling, the whole logits pipeline: min-tokens mask, penalties, greedy, temperature, top-k, top-p,\nper-request seeds, logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swiftkv.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingMetadata:
    """Per row of logits: its request's parameters and generator, prompt and output ids (for penalties), and the
    ids it may not sample yet (its stop ids, eos included, while it has fewer than ``min_tokens`` outputs)."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    prompt_ids: list[list[int]]
    output_ids: list[list[int]]
    blocked_ids: list[frozenset[int]]


@dataclass
class SamplerOutput:
    tokens: list[int | None]  # None for a failed row
    logprobs: list[tuple[float, dict[int, float]] | None]  # (chosen logprob, top-k logprobs) where asked
    errors: dict[int, str]  # {row: why it could not be sampled}


class Sampler:
    """The whole logits pipeline, in vLLM v1's order: fp32, the min-tokens mask, penalties, then per row greedy
    (batched) or temperature, top-k, top-p and a draw from its generator; logprobs (after the mask and penalties).

    A row that cannot be sampled (its logits, after penalties, temperature and top-k/top-p, hold no finite
    distribution) gets no token and an error message; the other rows are sampled as usual, so one request's
    parameters never fail its neighbours."""

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits [M, vocab] (left unchanged) -> one token (or error) per row."""
        params = meta.params
        edits = any(meta.blocked_ids) or any(p.has_penalties for p in params)
        logits = logits.to(torch.float32, copy=edits)  # the caller's logits are never changed
        for r, blocked in enumerate(meta.blocked_ids):
            if ids := [t for t in blocked if 0 <= t < logits.shape[-1]]:
                logits[r, ids] = float("-inf")
        if any(p.has_penalties for p in params):
            apply_penalties(logits, params, meta.prompt_ids, meta.output_ids)
        best = logits.argmax(-1)  # argmax takes a NaN as the maximum
        tokens: list[int | None] = best.tolist()
        top = logits.gather(1, best[:, None])[:, 0]  # NaN if a row holds one, -inf if every token is masked
        unusable = (top.isnan() | (top == float("-inf"))).tolist()
        errors: dict[int, str] = {}
        for r, p in enumerate(params):
            if unusable[r]:
                errors[r] = "the logits are NaN, or every token is masked: nothing can be sampled"
            elif not p.greedy:
                try:
                    tokens[r] = _sample_row(logits[r], p, meta.generators[r])
                except (RuntimeError, ValueError) as e:  # an invalid distribution from extreme parameters
                    errors[r] = f"sampling failed: {e}"
        for r in errors:
            tokens[r] = None
        logprobs: list[tuple[float, dict[int, float]] | None] = [None] * len(params)
        rows = [r for r, p in enumerate(params) if p.logprobs is not None and r not in errors]
        if rows:
            lp = torch.log_softmax(logits[rows], -1)
            for j, r in enumerate(rows):
                logprobs[r] = (float(lp[j, tokens[r]]), top_logprobs(lp[j], params[r].logprobs))
        return SamplerOutput(tokens, logprobs, errors)


def top_logprobs(logprobs: torch.Tensor, k: int) -> dict[int, float]:
    """The ``k`` most likely tokens of one row of logprobs ``[vocab]``: {token id: logprob} (empty for k = 0)."""
    if not k:
        return {}
    top = logprobs.topk(k)
    return dict(zip(top.indices.tolist(), top.values.tolist()))


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
    # the logits are fp32: their largest finite value bounds the division (a tiny temperature is greedy anyway,
    # SamplingParams.greedy); inf - inf in the softmax would otherwise give NaN
    x = (logits / p.temperature).clamp(min=torch.finfo(torch.float32).min, max=torch.finfo(torch.float32).max)
    x = torch.where(logits == float("-inf"), logits, x)  # masked tokens stay masked
    if p.top_k and p.top_k < x.shape[-1]:
        kth = x.topk(p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, idx = x.sort(descending=True)
        probs = sorted_x.softmax(-1)
        # drop tokens once the mass before them already reaches top_p; the first is always kept (a top_p that
        # rounds to 0 in fp32 would otherwise drop it too)
        drop = probs.cumsum(-1) - probs >= p.top_p
        drop[0] = False
        x = x.scatter(0, idx, sorted_x.masked_fill(drop, float("-inf")))
    probs = x.softmax(-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        raise ValueError("the sampling distribution is not finite (extreme temperature or penalties)")
    return int(torch.multinomial(probs, 1, generator=gen))
