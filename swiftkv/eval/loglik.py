"""Log-likelihoods of continuations under the teacher and the SwiftKV model, in one pass.

The first ``l`` layers are identical for both, so each batch runs them once and then the two
tails (full-sequence, batched in the flat layout, no per-token Python loops). Shared context
tokens run once (:mod:`swiftkv.eval.packing`). The LM head runs only at the positions whose next
token is scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from swiftkv.eval.packing import build_trees
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


@torch.no_grad()
def score_pairs(
    model: LlamaForCausalLM,
    pairs: list[tuple[list[int], list[int]]],
    max_batch_tokens: int = 4096,
    max_len: int | None = None,
    desc: str = "loglik",
    share_prefixes: bool = True,
) -> dict[str, list[Scored]]:
    """Score ``(context_ids, continuation_ids)`` pairs under the teacher and SwiftKV.

    Shared tokens are computed once (:mod:`swiftkv.eval.packing`): a context's continuations sit
    behind one copy of it, and with ``share_prefixes`` contexts with a common few-shot prefix (MMLU's
    per-subject 5 shots, TruthfulQA's) sit behind one copy of that prefix; the scores equal unshared
    scoring. Contexts are left-truncated to ``max_len``. Returns ``{"teacher": [...], "swiftkv": [...]}``
    in input order.
    """
    max_len = max_len or model.config.max_position_embeddings
    dev = model.compute_device
    groups: dict[tuple[int, ...], dict[tuple[int, ...], None]] = {}
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise ValueError("every pair needs context and continuation tokens (see encode_pair)")
        groups.setdefault(tuple(ctx), {})[tuple(cont)] = None
    trees = build_trees({k: list(v) for k, v in groups.items()}, max_len, max_batch_tokens, share_prefixes)
    found: dict[tuple[str, tuple[int, ...], tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] = {}
    lengths = [len(t.tokens) for t in trees]
    order = sorted(range(len(trees)), key=lambda i: -lengths[i])
    for batch in tqdm(_batches(order, lengths, max_batch_tokens), desc=desc, unit="batch", leave=False):
        seqs = [trees[i] for i in batch]
        seq_lens = [len(t.tokens) for t in seqs]
        offsets = torch.tensor([0] + seq_lens[:-1]).cumsum(0).tolist()
        ids = torch.tensor([tok for t in seqs for tok in t.tokens], device=dev)
        positions = torch.tensor([p for t in seqs for p in t.positions], device=dev)
        masks = [t.mask for t in seqs] if any(t.mask is not None for t in seqs) else None
        # every (context, continuation): flat rows of its predicting positions and its targets
        todo = [(key, [o + r for r in rows]) for t, o in zip(seqs, offsets) for key, rows in t.rows.items()]
        idx = torch.tensor([r for _, rows in todo for r in rows], device=dev)
        tgt = torch.tensor([tok for (_, cont), _ in todo for tok in cont], device=dev)
        sizes = [len(cont) for (_, cont), _ in todo]
        states = paired_forward(model, ids, positions, seq_lens, masks)
        for mode, hid in (("teacher", states.teacher), ("swiftkv", states.swiftkv)):
            logp = model.logits_at(hid, idx).float().log_softmax(-1)
            lp = logp.gather(1, tgt[:, None]).squeeze(1)
            top = logp.argmax(-1) == tgt
            for (key, _), a, b in zip(todo, lp.split(sizes), top.split(sizes)):
                found[(mode, *key)] = (a, b)
    return {mode: [Scored(*found[(mode, tuple(ctx), tuple(cont))]) for ctx, cont in pairs] for mode in MODES}
