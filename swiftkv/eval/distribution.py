"""Distribution metrics: KL(teacher || SwiftKV) and top-1 agreement on held-out chats (the
distillation split that never trains), and LAMBADA perplexity / last-word accuracy."""

from __future__ import annotations

import math
import random

import torch

from swiftkv.data.conversations import is_held_out, load_conversations
from swiftkv.data.rows import Batch, held_out_rows
from swiftkv.eval.loglik import MODES, encode_pair, score_pairs
from swiftkv.models.paired import distribution_gap, paired_forward


def held_out_conversations(data: str | None = None) -> list[tuple[str, list[dict]]]:
    """The held-out split of the distillation data (ShareGPT by default)."""
    return [c for c in load_conversations(data) if is_held_out(c[0])]


@torch.no_grad()
def held_out_kl(model, tokenizer, convs, num_rows: int = 16, seq_len: int = 512) -> dict[str, float]:
    """Mean per-token KL(teacher || SwiftKV) (temperature 1) and top-1 agreement on assistant tokens,
    over the rows the distillation log's ``eval_agree`` / ``eval_kl`` score (``held_out_rows``)."""
    rows = held_out_rows(tokenizer, convs, seq_len, num_rows)
    if not rows:
        raise ValueError("no held-out conversations to evaluate on")
    kl = agree = tokens = 0.0
    for i in range(0, len(rows), 4):
        batch = Batch.from_rows(rows[i : i + 4])
        states = paired_forward(model, batch.input_ids, batch.positions, batch.seq_lens)
        idx = batch.loss_mask.nonzero().squeeze(1)
        b_kl, b_agree = distribution_gap(model.logits_at(states.teacher, idx).float(),
                                         model.logits_at(states.swiftkv, idx).float())
        kl, agree, tokens = kl + float(b_kl), agree + float(b_agree), tokens + batch.num_loss_tokens
    return {"kl": kl / tokens, "top1_agreement": agree / tokens, "tokens": int(tokens)}


def held_out_prompts(tokenizer, convs, n: int, seed: int = 0, max_prompt_tokens: int = 512) -> list[list[int]]:
    """First user turns of ``n`` held-out conversations, chat-templated for generation."""
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    prompts = []
    for i in order:
        first = convs[i][1][0]
        if first["role"] != "user":
            continue
        ids = list(tokenizer.apply_chat_template([first], add_generation_prompt=True, tokenize=True, return_dict=False))
        if len(ids) <= max_prompt_tokens:
            prompts.append(ids)
        if len(prompts) == n:
            break
    return prompts


def lambada(model, tokenizer, passages: list[tuple[str, str]], max_batch_tokens: int = 4096) -> dict[str, dict]:
    """Per mode: token perplexity over whole passages and last-word accuracy (every token of the
    final word is the argmax), plus per-passage correctness for paired intervals."""
    pairs, last = [], []
    for ctx, word in passages:
        c, w = encode_pair(tokenizer, ctx, word)
        whole = c + w
        pairs.append(([whole[0]], whole[1:]))
        last.append(len(w))
    scored = score_pairs(model, pairs, max_batch_tokens, desc="lambada")
    out = {}
    for mode in MODES:
        nll = -sum(s.sum for s in scored[mode])
        n = sum(len(s.logprobs) for s in scored[mode])
        correct = [float(bool(s.greedy[-k:].all())) for s, k in zip(scored[mode], last)]
        out[mode] = {"ppl": math.exp(nll / n), "acc": sum(correct) / len(correct), "per_item_acc": correct}
    return out
