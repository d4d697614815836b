"""Synthetic prompt-heavy workloads: varied, seeded English-like prompts of a target length."""

from __future__ import annotations

import random

_WORDS = ("the report notes that revenue grew in the third quarter while costs fell and the team "
          "shipped a new data pipeline for customer analytics with lower latency and better accuracy "
          "across regions products and channels according to the summary below").split()


def make_prompts(n: int, approx_tokens: int, seed: int = 0) -> list[str]:
    """``n`` distinct prompts of about ``approx_tokens`` tokens (~1 token per word), ending in a question."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        body = " ".join(rng.choice(_WORDS) for _ in range(max(1, approx_tokens - 12)))
        prompts.append(f"Document {i}: {body}\nQuestion: summarise the document in one sentence.\nAnswer:")
    return prompts
