"""Teacher-response distillation data: the original model's own replies to the conversations' prompts.

ShareGPT's assistant turns were written by another model; what a SwiftKV student must reproduce is
its teacher's output distribution on the teacher's own kind of text. :func:`write_teacher_data`
takes each conversation's first prompt (the messages before its first assistant turn), lets the
teacher (the engine, original layers) answer it, and writes chat JSONL that ``swiftkv distill
--data`` reads. Conversation ids are kept, so the held-out split (by id hash) stays the same one;
``held_out`` conversations of that split are answered too, for held-out metrics on teacher text.

The file is written resumably: finished chunks of prompts (256: enough that the engine keeps its
batch full until a chunk's tail) are appended to a hidden ``.NAME.partial`` beside
it (flushed and fsynced), a rerun skips the ids already there, and the complete file appears by an
atomic rename. Each reply is sampled with a seed derived from its conversation id, so it does not
depend on chunking or on where a run was interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import replace
from pathlib import Path

from jinja2 import TemplateError
from tqdm.auto import tqdm

from swiftkv.data.conversations import is_held_out
from swiftkv.sampling_params import SamplingParams


def first_prompt(messages: list[dict]) -> list[dict] | None:
    """The messages before the first assistant turn, when they end with a user message."""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            head = messages[:i]
            return head if head and head[-1]["role"] == "user" else None
    return None


def select_prompts(tokenizer, convs: list[tuple[str, list[dict]]], num: int, held_out: int, max_prompt_tokens: int,
                   seed: int = 0, fraction: float = 0.01) -> list[tuple[str, list[dict], list[int]]]:
    """``(id, prompt messages, prompt token ids)`` of ``num`` training-split and ``held_out`` held-out
    conversations, in a seeded order, skipping prompts longer than ``max_prompt_tokens``."""
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    want = {False: num, True: held_out}
    out = []
    for idx in order:
        cid, msgs = convs[idx]
        split = is_held_out(cid, fraction)
        if want[split] <= 0 or (prompt := first_prompt(msgs)) is None:
            continue
        try:
            ids = list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False))
        except (TemplateError, ValueError):  # a template that rejects this conversation (e.g. role order)
            continue
        if len(ids) <= max_prompt_tokens:
            out.append((cid, prompt, ids))
            want[split] -= 1
        if want[False] <= 0 and want[True] <= 0:
            break
    return out


def _read_partial(path: Path) -> set[str]:
    """Ids already answered; a line cut by a kill (and anything after it) is dropped from the file."""
    if not path.exists():
        return set()
    done, good = set(), 0
    with open(path, "rb") as f:
        for line in f:
            try:
                done.add(json.loads(line)["id"])
            except (ValueError, KeyError):
                break
            good += len(line)
    os.truncate(path, good)
    return done


def _seed(cid: str, seed: int) -> int:
    return int(hashlib.sha256(f"{seed}:{cid}".encode()).hexdigest()[:8], 16)


def write_teacher_data(llm, prompts: list[tuple[str, list[dict], list[int]]], out: str | Path,
                       params: SamplingParams, chunk: int = 256, progress: bool = True) -> dict:
    """Answer every prompt with ``llm`` (its teacher mode) and write chat JSONL to ``out``.

    ``params.seed`` is the base seed of every reply's own seed. Resumes a partial file. Returns
    counts: conversations in the file; this run's prompt and reply tokens, replies cut by
    ``max_tokens`` and empty replies (left out)."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists; pass another --out or delete it")
    partial = out.with_name(f".{out.name}.partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _read_partial(partial)
    todo = [p for p in prompts if p[0] not in done]
    stats = {"conversations": len(done), "prompt_tokens": 0, "reply_tokens": 0, "cut": 0, "empty": 0}
    base = params.seed or 0
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), disable=not progress, desc="teacher replies")
    with open(partial, "a", encoding="utf-8") as f:
        for i in range(0, len(todo), chunk):
            part = todo[i : i + chunk]
            sps = [replace(params, seed=_seed(cid, base)) for cid, _, _ in part]
            results = llm.generate(prompt_token_ids=[ids for _, _, ids in part], sampling_params=sps)
            lines = []
            for (cid, msgs, ids), res in zip(part, results):
                reply = res.outputs[0]
                if not reply.text.strip():
                    stats["empty"] += 1
                    continue
                stats["prompt_tokens"] += len(ids)
                stats["reply_tokens"] += len(reply.token_ids)
                stats["cut"] += reply.finish_reason == "length"
                lines.append(json.dumps({"id": cid, "messages": [*msgs, {"role": "assistant", "content": reply.text}]}))
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
            stats["conversations"] += len(lines)
            bar.update(len(part))
    bar.close()
    os.replace(partial, out)
    return stats
