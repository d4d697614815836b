"""Token sampling, the whole logits pipeline: min-tokens mask, penalties, greedy, temperature, top-k, top-p,\nper-request seeds, logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swiftkv.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingMetadata:
    """Per row of logits: its request's parameters and generator, prompt and output ids (for penalties), and the
    ids it may not sample yet (its stop ids, eos included, while it has fewer than ``min_tokens`` outputs).

    ``draft_ids`` (speculative decoding; one list per sequence, None: no drafts) groups the rows: sequence ``i``
    owns ``len(draft_ids[i]) + 1`` consecutive rows, row ``j`` being the logits after its ``j``-th draft token, and
    that row's fields describe the sequence as if drafts ``[:j]`` were accepted (their output ids included)."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    prompt_ids: list[list[int]]
    output_ids: list[list[int]]
    blocked_ids: list[frozenset[int]]
    draft_ids: list[list[int]] | None = None


@dataclass
class SamplerOutput:
    """Per sequence: the tokens it emits this step (its accepted drafts, then one the model chose; empty for a
    failed sequence), their logprobs where asked, and why a sequence could not be sampled."""

    tokens: list[list[int]]
    logprobs: list[list[tuple[float, dict[int, float]]] | None]  # (chosen logprob, top-k logprobs) per token
    errors: dict[int, str]  # {sequence: why it could not be sampled}


class Sampler:
    """The whole logits pipeline, in vLLM v1's order: fp32, the min-tokens mask, penalties, then per row greedy
    (batched) or temperature, top-k, top-p and a draw from its generator; logprobs (after the mask and penalties).

    Draft tokens are verified in order: a greedy sequence keeps each draft that equals the argmax; a sampled one
    keeps draft ``d`` with probability ``p(d)`` and otherwise draws from ``p`` without ``d`` (the rejection rule of
    speculative sampling for a draft that proposes one token with certainty: every emitted token is distributed
    exactly as ``p``). The first token the model chose differently ends the sequence's tokens; when every draft is
    kept, the last row adds one more (the bonus token).

    A row that cannot be sampled (its logits, after penalties, temperature and top-k/top-p, hold no finite
    distribution) fails its sequence with an error message; the other sequences are sampled as usual, so one
    request's parameters never fail its neighbours."""

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits [rows, vocab] (left unchanged) -> the tokens (or error) of each sequence."""
        params = meta.params
        edits = any(meta.blocked_ids) or any(p.has_penalties for p in params)
        logits = logits.to(torch.float32, copy=edits)  # the caller's logits are never changed
        for r, blocked in enumerate(meta.blocked_ids):
            if ids := [t for t in blocked if 0 <= t < logits.shape[-1]]:
                logits[r, ids] = float("-inf")
        if any(p.has_penalties for p in params):
            apply_penalties(logits, params, meta.prompt_ids, meta.output_ids)
        best = logits.argmax(-1)  # argmax takes a NaN as the maximum
        top = logits.gather(1, best[:, None])[:, 0]  # NaN if a row holds one, -inf if every token is masked
        unusable = (top.isnan() | (top == float("-inf"))).tolist()
        best_ids = best.tolist()
        drafts = meta.draft_ids if meta.draft_ids is not None else [[]] * len(params)
        if sum(len(d) + 1 for d in drafts) != len(params):
            raise ValueError(f"{len(params)} rows of logits for {len(drafts)} sequences with "
                             f"{sum(map(len, drafts))} draft tokens")
        tokens: list[list[int]] = []
        logprobs: list[list[tuple[float, dict[int, float]]] | None] = [None] * len(drafts)
        reported: list[tuple[int, int, int]] = []  # (sequence, row, token) whose logprobs are asked for
        errors: dict[int, str] = {}
        r0 = 0  # the sequence's first row
        for i, draft in enumerate(drafts):
            chosen: list[int] = []
            for j, d in enumerate([*draft, None]):  # None: the bonus row, no draft to verify
                r = r0 + j
                if unusable[r]:
                    errors[i] = "the logits are NaN, or every token is masked: nothing can be sampled"
                    break
                try:
                    t = best_ids[r] if params[r].greedy else _sample_row(logits[r], params[r], meta.generators[r], d)
                except (RuntimeError, ValueError) as e:  # an invalid distribution from extreme parameters
                    errors[i] = f"sampling failed: {e}"
                    break
                chosen.append(t)
                if t != d:  # the model chose otherwise (or the bonus token): the rest is not verified
                    break
            tokens.append([] if i in errors else chosen)
            if params[r0].logprobs is not None and i not in errors:
                logprobs[i] = []
                reported += [(i, r0 + j, t) for j, t in enumerate(chosen)]
            r0 += len(draft) + 1
        if reported:  # one log-softmax for the step's reported rows
            lp = torch.log_softmax(logits[[r for _, r, _ in reported]], -1)
            for n, (i, r, t) in enumerate(reported):
                logprobs[i].append((float(lp[n, t]), top_logprobs(lp[n], params[r].logprobs)))
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


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None, draft: int | None = None) -> int:
    """One token from ``logits`` [vocab] under ``p``; with a ``draft`` token: the draft with probability p(draft),
    else a draw from p without it (exactly p overall)."""
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
    if draft is not None:
        if float(torch.rand((), generator=gen)) < float(probs[draft]):
            return draft
        probs[draft] = 0.0  # rejected: the residual max(p - q, 0) of a one-token draft q (multinomial normalises)
        if float(probs.sum()) <= 0:  # p(draft) rounded to 1: nothing else to draw
            return draft
    return int(torch.multinomial(probs, 1, generator=gen))
