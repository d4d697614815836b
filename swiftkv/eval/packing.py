"""Prefix trees for log-likelihood scoring: shared tokens are computed once.

A multiple-choice question is one context and several continuations; MMLU's 5-shot questions of one
subject (and TruthfulQA's questions) also share a long few-shot prefix. A :class:`Tree` lays out
one prefix, then per context its own remaining tokens (a *branch*), then that branch's
continuations; a boolean mask lets every token see exactly what it would see in its own unshared
sequence (its prefix, its branch, itself), and positions restart after the prefix for each branch,
so the scores equal unshared scoring.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

SHARE_MIN_TOKENS = 32  # contexts whose first 32 tokens agree are candidates for sharing a prefix

Branch = tuple[tuple[int, ...], list[tuple[int, ...]]]  # (context tokens after the prefix, its continuations)


@dataclass
class Tree:
    """One packed sequence: ``rows[(ctx, cont)]`` are the flat positions predicting ``cont``'s tokens."""

    tokens: list[int]
    positions: list[int]
    mask: torch.Tensor | None  # [n, n], True = attend; None = plain causal
    rows: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]]


def build_trees(groups: dict[tuple[int, ...], list[tuple[int, ...]]], max_len: int, max_tokens: int,
                share: bool = True) -> list[Tree]:
    """Pack ``{context: [continuations]}`` into trees of at most ``max_tokens`` tokens (a single
    context can exceed it). Contexts sharing at least :data:`SHARE_MIN_TOKENS` leading tokens share
    their common prefix (``share``); a context alone is left-truncated to fit ``max_len`` positions."""
    buckets: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for ctx in groups:
        key = ctx[:SHARE_MIN_TOKENS] if share and len(ctx) > SHARE_MIN_TOKENS else ctx
        buckets.setdefault(key, []).append(ctx)
    trees = []
    for ctxs in buckets.values():
        p = len(os.path.commonprefix(ctxs)) if len(ctxs) > 1 else 0  # element-wise on any sequences
        if len(ctxs) > 1 and p >= SHARE_MIN_TOKENS:
            p = min(p, min(len(c) for c in ctxs) - 1)  # every branch keeps its last context token
            fits = p + max(len(c) - p + max(len(x) for x in groups[c]) for c in ctxs) <= max_len
            if fits:
                trees += _shared_trees(ctxs[0][:p], [(c[p:], groups[c]) for c in ctxs], max_tokens)
                continue
        trees += [_single(c, groups[c], max_len) for c in ctxs]
    return trees


def _shared_trees(prefix: tuple[int, ...], branches: list[Branch], max_tokens: int) -> list[Tree]:
    """Branches under one prefix, split so each tree stays within ``max_tokens`` (one branch at least)."""
    trees, cur, used = [], [], len(prefix)
    for suffix, conts in branches:
        cost = len(suffix) + sum(len(c) for c in conts)
        if cur and used + cost > max_tokens:
            trees.append(_tree(prefix, cur))
            cur, used = [], len(prefix)
        cur.append((suffix, conts))
        used += cost
    return trees + ([_tree(prefix, cur)] if cur else [])


def _single(ctx: tuple[int, ...], conts: list[tuple[int, ...]], max_len: int) -> Tree:
    longest = max(len(c) for c in conts)
    if longest >= max_len:
        raise ValueError(f"a continuation of {longest} tokens does not fit max_len={max_len}")
    kept = ctx[-(max_len - longest):]  # left-truncate the context so every continuation fits
    tree = _tree(kept, [((), conts)])
    tree.rows = {(ctx, cont): r for (_, cont), r in tree.rows.items()}  # keyed by the untruncated context
    return tree


def _tree(prefix: tuple[int, ...], branches: list[Branch]) -> Tree:
    p = len(prefix)
    tokens, positions = list(prefix), list(range(p))
    spans = []  # (start, length, visible-before start) of every block after the prefix
    rows = {}
    for suffix, conts in branches:
        b0 = len(tokens)
        tokens += suffix
        positions += range(p, p + len(suffix))
        spans.append((b0, len(suffix), []))
        last = b0 + len(suffix) - 1 if suffix else p - 1  # predicts each continuation's first token
        for cont in conts:
            c0 = len(tokens)
            rows[(prefix + suffix, cont)] = [last] + [c0 + j for j in range(len(cont) - 1)]
            tokens += cont
            positions += range(p + len(suffix), p + len(suffix) + len(cont))
            spans.append((c0, len(cont), [(b0, len(suffix))]))
    n = len(tokens)
    if len(branches) == 1 and len(branches[0][1]) == 1:  # one chain: plain causal
        return Tree(tokens, positions, None, rows)
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
    for start, length, seen in spans:
        if not length:
            continue
        mask[start : start + length, :p] = True  # the prefix
        for s0, sl in seen:  # the branch's own context tokens
            mask[start : start + length, s0 : s0 + sl] = True
        mask[start : start + length, start : start + length] = torch.ones(length, length, dtype=torch.bool).tril()
    return Tree(tokens, positions, mask, rows)
