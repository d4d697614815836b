"""One request's state as the engine sees it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from swiftkv.engine.detokenizer import IncrementalDetokenizer
from swiftkv.engine.spec_decode import DraftStats
from swiftkv.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """Token ids (prompt + generated), KV blocks and progress of one generation (one of a
    :class:`~swiftkv.engine.request.Request`'s ``n`` samples)."""

    seq_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix hash of each full block (prefix caching)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    finish_reason: str | None = None
    num_preemptions: int = 0
    # per generated token: (logprob of chosen token, {token_id: logprob} of the top alternatives)
    logprobs: list[tuple[float, dict[int, float]]] = field(default_factory=list)
    detokenizer: IncrementalDetokenizer | None = None  # output text, extended every step (engine-owned)
    request_id: str = ""  # the request this sequence samples for
    generator: torch.Generator | None = None  # seeded per sequence; None = greedy
    cache_salt: str | None = None  # mixed into the first block's prefix hash: only the same salt shares a prefix
    stop_scanned_chars: int = 0  # output text already searched for stop strings (only the new tail is searched)
    spec_token_ids: list[int] = field(default_factory=list)  # draft tokens to verify next step (speculative decoding)
    draft_stats: DraftStats = field(default_factory=DraftStats)  # how its drafts fared (their adaptive length)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
