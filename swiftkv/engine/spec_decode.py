"""Model-free speculative decoding: prompt-lookup (n-gram) drafts, in vLLM's configuration syntax.

After a sequence samples a token, :class:`NgramProposer` looks for the latest earlier occurrence of its last
``n`` tokens (prompt and output so far; ``n`` from ``prompt_lookup_max`` down to ``prompt_lookup_min``) and
proposes the up to ``num_speculative_tokens`` tokens that followed it. The next step runs those drafts with the
sequence's pending token, as a short chunk whose every token gets logits (in SwiftKV mode they run every layer;
their later layers' K/V still come from layer l), and the sampler keeps the longest prefix that the model's own
choice confirms (:meth:`swiftkv.layers.sampler.Sampler.__call__`: identical tokens when greedy, the rejection
rule that keeps the distribution exact when sampling). Rejected drafts' KV slots are rolled back by the
scheduler; prefix-cache blocks only ever hold accepted tokens. RAG answers, summaries and extractions quote their
prompts, so drafts hit there; in chat they rarely do.

On a CPU a verification row is not free, and its price depends on the model and the CPU: the 135M default model's
4-bit weights make the decode kernels compute bound (Zen 4: 7.4 -> 10.8 ms for a second row, +46%), the
Llama-3.2-1B shape's bf16 weights keep them memory bound (78 -> 81 ms, +4%). So by default (``"adaptive": true``,
a swiftkv key) the engine fits its decode steps' time against their rows (:class:`StepCost`) and each sequence
verifies only as many drafts as pay for their rows, given its own acceptance so far (:class:`DraftStats`); one
whose drafts stop hitting verifies none, while its proposals keep being checked against the tokens it then samples
(free), so it starts again when they hit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

METHODS = ("ngram",)
DRAFT_ROW_COST = 0.4  # one more row as a fraction of a one-row decode step, until the engine has measured its own
DECAY = 0.8  # weight of a sequence's earlier acceptance observations against its newest
STEP_DECAY = 0.98  # weight of earlier decode steps in the step-time fit


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's ``--speculative-config`` for the n-gram method: ``{"method": "ngram", "num_speculative_tokens": 4,
    "prompt_lookup_max": 4, "prompt_lookup_min": 2}``."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    adaptive: bool = True  # swiftkv: draft length per sequence from its acceptance (False: always up to the maximum)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method {self.method!r} is not supported here; use one of {list(METHODS)} "
                             "(model-free prompt lookup)")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"speculative config: {name} must be a positive integer, got {v!r}")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"speculative config: adaptive must be true or false, got {self.adaptive!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative config: prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")

    @classmethod
    def parse(cls, spec: str | dict | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """From a JSON object (the CLI's string), a dict or a config; None stays None. As in vLLM, a missing
        ``prompt_lookup_min`` / ``max`` takes the other's value (both missing: 2..4). Raises ``ValueError`` saying
        what is wrong (unknown keys included)."""
        if spec is None or isinstance(spec, SpeculativeConfig):
            return spec
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative config is not valid JSON ({e.msg}); give an object such as "
                                 '\'{"method": "ngram", "num_speculative_tokens": 4}\'') from None
        if not isinstance(spec, dict):
            raise ValueError(f"speculative config must be a JSON object, got {type(spec).__name__}")
        unknown = set(spec) - {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "adaptive"}
        if unknown:
            raise ValueError(f"speculative config: unknown key(s) {sorted(unknown)}; known: method, "
                             "num_speculative_tokens, prompt_lookup_max, prompt_lookup_min, adaptive")
        if "method" not in spec or "num_speculative_tokens" not in spec:
            raise ValueError("speculative config needs 'method' and 'num_speculative_tokens', e.g. "
                             '{"method": "ngram", "num_speculative_tokens": 4}')
        lo, hi = spec.get("prompt_lookup_min"), spec.get("prompt_lookup_max")
        lo, hi = (2, 4) if lo is None and hi is None else (lo if lo is not None else hi, hi if hi is not None else lo)
        return cls(spec["method"], spec["num_speculative_tokens"], hi, lo, spec.get("adaptive", True))


@dataclass
class DraftStats:
    """One sequence's acceptance so far (decayed counts, optimistic at the start) and the proposal it did not
    verify, to be checked against the token it samples next."""

    accepted: float = 3.0
    rejected: float = 0.0
    unverified: int | None = None

    @property
    def acceptance(self) -> float:
        """Estimated chance that a draft is accepted, given the ones before it were."""
        return (self.accepted + 1) / (self.accepted + self.rejected + 2)

    def observe(self, drafted: int, accepted: int) -> None:
        """``accepted`` of ``drafted`` drafts were accepted (the first rejection ends a run)."""
        self.accepted = DECAY * self.accepted + accepted
        self.rejected = DECAY * self.rejected + (accepted < drafted)

    def length(self, max_drafts: int, row_cost: float = DRAFT_ROW_COST) -> int:
        """The draft length with the most expected tokens per step cost, ``sum(a^i, i <= k) / (1 + k * row_cost)``
        (``row_cost``: one more row as a fraction of the step without drafts)."""
        a, best, best_gain, tokens = self.acceptance, 0, 1.0, 1.0
        for k in range(1, max_drafts + 1):
            tokens += a**k
            if (gain := tokens / (1 + k * row_cost)) > best_gain:
                best, best_gain = k, gain
        return best


class StepCost:
    """Decode steps' time fitted as ``a + b * rows`` (least squares, earlier steps decayed), measured by the engine
    on its own model and CPU: what one more verification row costs."""

    def __init__(self) -> None:
        self.sums = np.zeros(5)  # decayed n, sum rows, sum t, sum rows^2, sum rows*t

    def add(self, rows: int, seconds: float) -> None:
        self.sums = STEP_DECAY * self.sums + np.array([1.0, rows, seconds, rows * rows, rows * seconds])

    def row_cost(self, batch: int) -> float:
        """One more row as a fraction of a step of ``batch`` rows (:data:`DRAFT_ROW_COST` until steps of different
        sizes were seen)."""
        n, r, t, rr, rt = self.sums
        var = n * rr - r * r
        if n < 4 or var < 0.5 * n * n:  # rows have not varied enough (sd < ~0.7) to fit a slope
            return DRAFT_ROW_COST
        b = (n * rt - r * t) / var
        a = (t - b * r) / n
        step = a + b * batch
        return float(np.clip(b / step, 0.01, 2.0)) if step > 0 else DRAFT_ROW_COST


class NgramProposer:
    """Prompt-lookup drafts over one sequence's tokens (no model, no state between calls)."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config

    def propose(self, token_ids: list[int], max_drafts: int | None = None) -> list[int]:
        """Up to ``num_speculative_tokens`` (and ``max_drafts``) tokens that followed the latest earlier
        occurrence of the longest suffix of ``token_ids`` of ``prompt_lookup_min..max`` tokens; [] if none."""
        c = self.config
        k = c.num_speculative_tokens if max_drafts is None else min(c.num_speculative_tokens, max_drafts)
        if k <= 0 or len(token_ids) <= c.prompt_lookup_min:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        total = len(tokens)
        for n in range(min(c.prompt_lookup_max, total - 1), c.prompt_lookup_min - 1, -1):
            suffix = tokens[total - n :]
            windows = np.lib.stride_tricks.sliding_window_view(tokens[: total - 1], n)  # [total - n, n]
            hits = np.flatnonzero((windows == suffix).all(axis=1))  # starts of earlier occurrences
            if hits.size:
                start = int(hits[-1]) + n  # what followed the latest one
                return tokens[start : start + k].tolist()
        return []


@dataclass
class SpecDecodingStats:
    """Counters since the engine started (vLLM's ``spec_decode`` metrics): verification steps with drafts, draft
    tokens verified, and of those accepted."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def add(self, drafted: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification step: the accepted drafts and the model's own token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0
