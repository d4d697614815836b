"""Tokenization for the server: off the event loop, in two lanes so that one client's long prompts never hold
up another's short ones, and a prompt that cannot fit the model refused from its length before any tokenizing."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

SHORT_PROMPT_CHARS = 16_384  # prompts up to this many characters take the short lane


def max_token_chars(tokenizer) -> int:
    """The most characters of text one token can stand for: its vocabulary's longest entry (a byte-level or
    SentencePiece entry is never shorter than the text it decodes to)."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1)


class TokenizerLanes:
    """Two single-thread lanes, each with its own tokenizer instance (a Hugging Face tokenizer is not meant for
    concurrent use): prompts up to ``SHORT_PROMPT_CHARS`` characters in one, longer ones in the other.
    ``max_prompt_chars``: a prompt longer than this cannot fit ``max_model_len`` tokens whatever it says
    (twice the vocabulary's longest entry per token, a margin for normalisers that merge characters)."""

    def __init__(self, tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_prompt_chars = 2 * max_token_chars(tokenizer) * max_model_len
        self._short = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swiftkv-tokenize")
        self._long = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swiftkv-tokenize-long")
        self._long_tokenizer = None  # copied on first use: most servers never see a long prompt

    def too_long(self, chars: int) -> str | None:
        """Why a prompt of ``chars`` characters is refused before tokenizing, or None."""
        if chars > self.max_prompt_chars:
            return (f"prompt has {chars:,} characters; no text that long fits the model's context (at most "
                    f"{self.max_prompt_chars:,} characters could); shorten it")
        return None

    async def run(self, chars: int, fn: Callable[..., T]) -> T:
        """``fn(tokenizer)`` in the lane for a prompt of ``chars`` characters."""
        loop = asyncio.get_running_loop()
        if chars <= SHORT_PROMPT_CHARS:
            return await loop.run_in_executor(self._short, fn, self.tokenizer)
        return await loop.run_in_executor(self._long, lambda: fn(self._long_lane_tokenizer()))

    def _long_lane_tokenizer(self):
        """The long lane's own tokenizer, copied there on first use (most servers never see a long prompt)."""
        if self._long_tokenizer is None:
            self._long_tokenizer = copy.deepcopy(self.tokenizer)
        return self._long_tokenizer

    def shutdown(self) -> None:
        for pool in (self._short, self._long):
            pool.shutdown(wait=False, cancel_futures=True)
