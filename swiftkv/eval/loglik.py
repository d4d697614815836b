"""Log-likelihoods of continuations under the teacher and the SwiftKV model, in one pass.

The first ``l`` layers are identical for both, so each batch runs them once and then the two
tails (full-sequence, batched in the flat layout, no per-token Python loops). The LM head runs
only at the positions whose next token is scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from swiftkv.models.llama import LlamaForCausalLM
from swiftkv.models.paired import paired_forward

MODES = ("teacher", "swiftkv")


@dataclass
class Scored:
    """Per-token log-probabilities of one continuation and whether each token was the argmax."""

    logprobs: torch.Tensor  # [num_continuation_tokens] fp32
    greedy: torch.Tensor  # [num_continuation_tokens] bool

    @property
    def sum(self) -> float:
        return float(self.logprobs.sum())


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokenise as lm-evaluation-harness does: trailing spaces of the context move to the
    continuation, and the continuation tokens are the tail of the encoded concatenation."""
    n = len(context) - len(context.rstrip(" "))
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if not continuation:
        raise ValueError("empty continuation")
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    if not ctx:  # nothing to condition on: start from the tokenizer's BOS/EOS token, as lm-eval does
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [bos], whole
    return ctx, whole[len(ctx):]


def _batches(order: list[int], lengths: list[int], max_tokens: int) -> list[list[int]]:
    out, cur, used = [], [], 0
    for i in order:
        if cur and used + lengths[i] > max_tokens:
            out.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += lengths[i]
    return out + ([cur] if cur else [])


@dataclass
class _Packed:
    """One shared context followed by its distinct continuations, each seeing only the context
    and itself (a tree mask); ``rows[c]`` are the positions predicting continuation ``c``."""

    tokens: list[int]
    positions: list[int]
    mask: torch.Tensor | None
    rows: dict[tuple[int, ...], list[int]]


def _pack(ctx: list[int], conts: list[tuple[int, ...]], max_len: int) -> _Packed:
    longest = max(len(c) for c in conts)
    if longest >= max_len:
        raise ValueError(f"a continuation of {longest} tokens does not fit max_len={max_len}")
    ctx = ctx[-(max_len - longest):]  # left-truncate the context so every branch fits
    c = len(ctx)
    tokens, positions, rows = list(ctx), list(range(c)), {}
    for cont in conts:
        start = len(tokens)
        # position c-1 predicts cont[0]; this branch's token j predicts cont[j+1]
        rows[cont] = [c - 1] + [start + j for j in range(len(cont) - 1)]
        tokens += cont
        positions += range(c, c + len(cont))
    mask = None
    if len(conts) > 1:
        n = len(tokens)
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        start = c
        for cont in conts:  # a branch must not see earlier branches
            mask[start : start + len(cont), c:start] = False
            start += len(cont)
    return _Packed(tokens, positions, mask, rows)


@torch.no_grad()
def score_pairs(
    model: LlamaForCausalLM,
    pairs: list[tuple[list[int], list[int]]],
    max_batch_tokens: int = 4096,
    max_len: int | None = None,
    desc: str = "loglik",
) -> dict[str, list[Scored]]:
    """Score ``(context_ids, continuation_ids)`` pairs under the teacher and SwiftKV.

    Pairs with the same context share one packed sequence: the context once, then each distinct
    continuation behind a tree mask (a 10-choice question costs one context, not ten).
    Contexts are left-truncated to ``max_len``. Returns ``{"teacher": [...], "swiftkv": [...]}``
    in input order.
    """
    max_len = max_len or model.config.max_position_embeddings
    dev = model.model.embed_tokens.weight.device
    groups: dict[tuple[int, ...], dict[tuple[int, ...], None]] = {}
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise ValueError("every pair needs context and continuation tokens (see encode_pair)")
        groups.setdefault(tuple(ctx), {})[tuple(cont)] = None
    keys = list(groups)
    packed = [_pack(list(k), list(groups[k]), max_len) for k in keys]
    found: dict[tuple[str, int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] = {}
    lengths = [len(pk.tokens) for pk in packed]
    order = sorted(range(len(packed)), key=lambda i: -lengths[i])
    for batch in tqdm(_batches(order, lengths, max_batch_tokens), desc=desc, unit="batch", leave=False):
        seqs = [packed[i] for i in batch]
        seq_lens = [len(pk.tokens) for pk in seqs]
        offsets = torch.tensor([0] + seq_lens[:-1]).cumsum(0).tolist()
        ids = torch.tensor([t for pk in seqs for t in pk.tokens], device=dev)
        positions = torch.tensor([p for pk in seqs for p in pk.positions], device=dev)
        masks = [pk.mask for pk in seqs] if any(pk.mask is not None for pk in seqs) else None
        # every (sequence, continuation): flat rows of its predicting positions and its targets
        todo = [(i, cont, [o + r for r in pk.rows[cont]]) for i, pk, o in zip(batch, seqs, offsets) for cont in pk.rows]
        idx = torch.tensor([r for _, _, rows in todo for r in rows], device=dev)
        tgt = torch.tensor([t for _, cont, _ in todo for t in cont], device=dev)
        states = paired_forward(model, ids, positions, seq_lens, masks)
        for mode, hid in (("teacher", states.teacher), ("swiftkv", states.swiftkv)):
            logp = model.logits_at(hid, idx).float().log_softmax(-1)
            lp = logp.gather(1, tgt[:, None]).squeeze(1)
            top = logp.argmax(-1) == tgt
            for (i, cont, _), a, b in zip(todo, lp.split([len(c) for _, c, _ in todo]),
                                          top.split([len(c) for _, c, _ in todo])):
                found[(mode, i, cont)] = (a, b)
    index = {k: i for i, k in enumerate(keys)}
    out: dict[str, list[Scored]] = {m: [] for m in MODES}
    for ctx, cont in pairs:
        i = index[tuple(ctx)]
        for mode in MODES:
            out[mode].append(Scored(*found[(mode, i, tuple(cont))]))
    return out
