"""Conversations as model input: rendered with the model's chat template, with assistant-token masks,
packed into fixed-length rows of one split, and flattened into a :class:`Batch`.

A packed row keeps its conversations apart: each is its own sequence in the flat batch (positions
restart, attention never crosses conversations).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from swiftkv.data.conversations import is_held_out


def tokenize_with_mask(tokenizer, messages: list[dict], max_len: int) -> tuple[list[int], list[bool]] | None:
    """Chat-template tokens and a mask that is True on assistant reply tokens (the loss tokens)."""
    def render(msgs, gen):
        return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=False))

    ids = render(messages, False)
    mask = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = len(render(messages[:i], True)), len(render(messages[: i + 1], False))
        if render(messages[: i + 1], False) != ids[:end]:
            return None  # template is not prefix-stable for this conversation: skip it
        for t in range(start, min(end, len(ids))):
            mask[t] = True
    ids, mask = ids[:max_len], mask[:max_len]
    return (ids, mask) if any(mask) else None


@dataclass
class Row:
    """One packed row: several conversations, each its own sequence."""

    docs: list[tuple[list[int], list[bool]]]

    @property
    def num_tokens(self) -> int:
        return sum(len(d[0]) for d in self.docs)

    @property
    def num_loss_tokens(self) -> int:
        """Tokens whose next token is an assistant token (what :class:`Batch` puts the loss on)."""
        return sum(sum(mask[1:]) for _, mask in self.docs)


def pack_rows(tokenizer, convs: list[tuple[str, list[dict]]], seq_len: int, max_tokens: int | None,
              seed: int, held_out: bool, fraction: float = 0.01) -> list[Row]:
    """Deterministically shuffle, tokenize and pack conversations of one split into rows."""
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)

    def docs():
        for idx in order:
            cid, msgs = convs[idx]
            if is_held_out(cid, fraction) != held_out:
                continue
            try:
                doc = tokenize_with_mask(tokenizer, msgs, seq_len)
            except Exception:  # a template that rejects this conversation (e.g. role order): skip it
                doc = None
            if doc is not None:
                yield doc

    return _pack(docs(), seq_len, max_tokens)


def held_out_rows(tokenizer, convs: list[tuple[str, list[dict]]], seq_len: int, num_rows: int,
                  fraction: float = 0.01) -> list[Row]:
    """The first ``num_rows`` packed rows of the held-out split, in one fixed order whatever the
    training seed and whether ``convs`` is the whole data or only its held-out part: the rows that
    every held-out metric scores (the trainer's log and ``swiftkv eval``), so their figures compare."""
    held = [c for c in convs if is_held_out(c[0], fraction)]
    return pack_rows(tokenizer, held, seq_len, None, 0, held_out=True, fraction=fraction)[:num_rows]


def training_rows(tokenizer, convs: list[tuple[str, list[dict]]], seq_len: int, max_tokens: int, seed: int,
                  fraction: float = 0.01, epochs: int = 1) -> list[Row]:
    """Rows of the training split totalling ``max_tokens``: ``max_tokens / epochs`` of it packed in a
    seeded order, then, while the budget lasts, the same tokenized conversations again in another
    seeded order (one more epoch; also when the split is smaller than the budget)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    rows = pack_rows(tokenizer, convs, seq_len, -(-max_tokens // epochs), seed, held_out=False, fraction=fraction)
    total = sum(r.num_tokens for r in rows)
    if total >= max_tokens or not rows:
        return rows
    docs = [d for r in rows for d in r.docs]  # the first epoch's conversations, tokenized once
    epoch = 1
    while total < max_tokens:
        order = list(docs)
        random.Random(seed + epoch).shuffle(order)
        more = _pack(iter(order), seq_len, max_tokens - total)
        rows += more
        total += sum(r.num_tokens for r in more)
        epoch += 1
    return rows


def _pack(docs, seq_len: int, max_tokens: int | None) -> list[Row]:
    """Greedy packing of ``docs`` (in order) into rows of at most ``seq_len`` tokens, stopping once
    ``max_tokens`` are packed."""
    rows, cur, cur_len, total = [], [], 0, 0
    for doc in docs:
        if cur_len + len(doc[0]) > seq_len and cur:
            rows.append(Row(cur))
            total += cur_len
            cur, cur_len = [], 0
            if max_tokens is not None and total >= max_tokens:
                break
        cur.append(doc)
        cur_len += len(doc[0])
    if cur and (max_tokens is None or total < max_tokens):
        rows.append(Row(cur))
    return rows


@dataclass
class Batch:
    input_ids: torch.Tensor  # [N] flat tokens of all conversations of all rows
    positions: torch.Tensor  # [N]
    seq_lens: list[int]  # one entry per conversation
    loss_mask: torch.Tensor  # [N] bool: assistant tokens whose next token is predicted
    # from a FeatureCache (swiftkv.distill.features): the frozen model's states, so a step skips it
    h_l: torch.Tensor | None = None  # [N, hidden] residual stream entering layer l
    teacher_hidden: torch.Tensor | None = None  # [num_loss_tokens, hidden] teacher's last layer output

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

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with its tensors on ``device`` (the model's)."""
        def move(t):
            return None if t is None else t.to(device)

        return Batch(self.input_ids.to(device), self.positions.to(device), self.seq_lens, self.loss_mask.to(device),
                     move(self.h_l), move(self.teacher_hidden))
