"""OpenAI response bodies and stream chunks built from engine outputs."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator

from swiftkv.outputs import CompletionOutput


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _json_number(x: float) -> float | None:
    """A logprob as JSON allows it: -inf (a masked token) or NaN is ``null``, not a bare ``-Infinity``/``NaN``
    that JSON parsers refuse (nor a 500 from a strict encoder)."""
    return x if math.isfinite(x) else None


def _completion_logprobs(c: CompletionOutput, tokenizer, start: int = 0) -> dict | None:
    if c.logprobs is None:
        return None
    lps = c.logprobs[start:]
    return {
        "tokens": [tokenizer.decode([lp.token_id]) for lp in lps],
        "token_logprobs": [_json_number(lp.logprob) for lp in lps],
        "top_logprobs": [{tokenizer.decode([t]): _json_number(v) for t, v in lp.top.items()} for lp in lps],
        "text_offset": [],
    }


def _chat_logprobs(c: CompletionOutput, tokenizer, start: int = 0) -> dict | None:
    if c.logprobs is None:
        return None

    def entry(tok: int, lp: float) -> dict:
        s = tokenizer.decode([tok])
        return {"token": s, "logprob": _json_number(lp), "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top.items()]}
                        for lp in c.logprobs[start:]]}


def _finals(outs: list[tuple[int, CompletionOutput]]) -> dict[int, CompletionOutput]:
    return {i: c for i, c in outs if c.finish_reason is not None}


def completion_response(rid, model, outs, tokenizer, jobs) -> dict:
    finals = _finals(outs)
    choices = [{"index": i, "text": c.text, "logprobs": _completion_logprobs(c, tokenizer), "finish_reason": c.finish_reason}
               for i, c in sorted(finals.items())]
    prompt_tokens = sum(len(ids) for ids, _ in jobs)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices,
            "usage": _usage(prompt_tokens, sum(len(c.token_ids) for c in finals.values()))}


def chat_response(rid, model, outs, tokenizer, prompt_tokens) -> dict:
    finals = _finals(outs)
    choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                "logprobs": _chat_logprobs(c, tokenizer), "finish_reason": c.finish_reason}
               for i, c in sorted(finals.items())]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": choices,
            "usage": _usage(prompt_tokens, sum(len(c.token_ids) for c in finals.values()))}


async def _deltas(first, stream: AsyncIterator) -> AsyncIterator[tuple[int, CompletionOutput, str, int]]:
    """(choice index, output, new text, index of the first new token) for each update."""
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    item = first
    while item is not None:
        i, c = item
        t0, n0 = sent_text.get(i, 0), sent_tokens.get(i, 0)
        sent_text[i], sent_tokens[i] = max(t0, len(c.text)), len(c.token_ids)
        yield i, c, c.text[t0:], n0
        item = await anext(stream, None)


async def completion_chunks(rid, model, first, stream, tokenizer, req, jobs) -> AsyncIterator[dict]:
    created, completion_tokens = int(time.time()), {}
    async for i, c, text, n0 in _deltas(first, stream):
        completion_tokens[i] = len(c.token_ids)
        yield {"id": rid, "object": "text_completion", "created": created, "model": model,
               "choices": [{"index": i, "text": text, "logprobs": _completion_logprobs(c, tokenizer, n0),
                            "finish_reason": c.finish_reason}]}
    if req.stream_options and req.stream_options.include_usage:
        prompt_tokens = sum(len(ids) for ids, _ in jobs)
        yield {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
               "usage": _usage(prompt_tokens, sum(completion_tokens.values()))}


async def chat_chunks(rid, model, first, stream, tokenizer, req, prompt_tokens) -> AsyncIterator[dict]:
    created, completion_tokens, started = int(time.time()), {}, set()
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    async for i, c, text, n0 in _deltas(first, stream):
        completion_tokens[i] = len(c.token_ids)
        delta = {"content": text}
        if i not in started:
            started.add(i)
            delta = {"role": "assistant", "content": text}
        yield {**base, "choices": [{"index": i, "delta": delta, "logprobs": _chat_logprobs(c, tokenizer, n0),
                                    "finish_reason": c.finish_reason}]}
    if req.stream_options and req.stream_options.include_usage:
        yield {**base, "choices": [], "usage": _usage(prompt_tokens, sum(completion_tokens.values()))}
