"""Sampling parameters for generation, shaped like vLLM's, validated with clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

GREEDY_BELOW = 1e-5  # a temperature below this samples greedily (vLLM's _SAMPLING_EPS)
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 512  # each is searched in the output every step (OpenAI allows 4)
FP32_TINY, FP32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38  # fp32's smallest normal and largest finite


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    ``temperature`` below 1e-5 is greedy (as vLLM: a smaller one would only overflow fp32). ``top_p`` always
    keeps the most likely token. ``seed`` makes sampling reproducible per request.
    ``logprobs = k`` returns the chosen token's logprob and the top-``k`` alternatives per step;
    ``prompt_logprobs = k`` returns them for prompt tokens (computed with the full-sequence path).
    Penalties as vLLM applies them, to the logits before sampling: ``repetition_penalty`` (> 0, 1 = off)
    divides the positive logits and multiplies the negative ones of every token seen in the prompt or the
    output; ``frequency_penalty`` and ``presence_penalty`` (in [-2, 2], 0 = off) subtract ``f x count`` and
    ``p x (count > 0)`` for the tokens generated so far.
    ``num_speculative_tokens`` (an engine with speculative decoding only): at most this many draft tokens per
    step for this request, 0 for none (say, a chat turn that rarely quotes its prompt); None: the engine's.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    num_speculative_tokens: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}"),
            (_num(self.temperature) and 0 <= self.temperature < float("inf"),
             f"temperature must be a finite number >= 0, got {self.temperature!r}"),
            (_num(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}"),
            (self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}"),
            (self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             f"max_tokens must be a positive integer, got {self.max_tokens!r}"),
            (isinstance(self.min_tokens, int) and self.min_tokens >= 0,
             f"min_tokens must be a non-negative integer, got {self.min_tokens!r}"),
            (not isinstance(self.min_tokens, int) or self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}"),
            (_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}"),
            (_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}"),
            (_num(self.repetition_penalty) and FP32_TINY <= self.repetition_penalty <= FP32_MAX,
             (f"repetition_penalty must be greater than zero (1 = off) and within fp32's normal range "
              f"[{FP32_TINY:.3g}, {FP32_MAX:.3g}], got {self.repetition_penalty!r}")),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be a non-empty string or a list of them"),
            (len(self.stop) <= MAX_STOP_STRINGS and all(len(s) <= MAX_STOP_CHARS for s in self.stop),
             (f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters each, got "
              f"{len(self.stop)} (longest {max(map(len, self.stop), default=0)})")),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be non-negative integers"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             f"logprobs must be an integer in [0, 20], got {self.logprobs!r}"),
            (self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= 20),
             f"prompt_logprobs must be an integer in [0, 20], got {self.prompt_logprobs!r}"),
            (self.num_speculative_tokens is None or (isinstance(self.num_speculative_tokens, int)
                                                     and self.num_speculative_tokens >= 0),
             f"num_speculative_tokens must be a non-negative integer, got {self.num_speculative_tokens!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @cached_property
    def stop_token_set(self) -> frozenset[int]:
        """``stop_token_ids`` as a set: checked for every generated token."""
        return frozenset(self.stop_token_ids)

    def stop_ids(self, eos_token_ids: frozenset[int] | set[int]) -> frozenset[int]:
        """The token ids that end this request: ``stop_token_ids``, and the model's eos ids unless ``ignore_eos``
        (none of them can be sampled before ``min_tokens``)."""
        return self.stop_token_set if self.ignore_eos else self.stop_token_set | eos_token_ids

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # rejects NaN
