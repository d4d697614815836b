"""When a sequence stops (vLLM's ``StopChecker``), and its output text cut at a stop string."""

from __future__ import annotations

from swiftkv.engine.sequence import Sequence


def raw_text(seq: Sequence) -> str:
    """Detokenised output so far (incremental: an incomplete trailing character is held back)."""
    return seq.detokenizer.text if seq.detokenizer is not None else ""


def output_text(seq: Sequence) -> str:
    """The output text a user sees: up to the first stop string, which is not included."""
    text = raw_text(seq)
    for s in seq.params.stop:
        if (cut := text.find(s)) != -1:
            text = text[:cut]
    return text


class StopChecker:
    """Checks each appended token: a stop id or eos (after ``min_tokens``), a stop string in the new text,
    ``max_tokens`` or the model's context."""

    def __init__(self, eos_token_ids: set[int], max_model_len: int) -> None:
        self.eos_token_ids, self.max_model_len = eos_token_ids, max_model_len

    def check(self, seq: Sequence, token: int) -> str | None:
        """Why ``seq`` stops after ``token`` (its last token): ``"stop"``, ``"length"``, or None."""
        p = seq.params
        n_out = seq.num_tokens - seq.num_prompt_tokens
        if n_out >= p.min_tokens:
            if token in p.stop_token_set or (not p.ignore_eos and token in self.eos_token_ids):
                return "stop"
            if p.stop:
                text = raw_text(seq)
                # only the new tail (plus what a stop string may straddle): not the whole text every step
                start = max(0, min(seq.stop_scanned_chars, len(text)) - max(map(len, p.stop)) + 1)
                seq.stop_scanned_chars = len(text)
                if any(text.find(s, start) != -1 for s in p.stop):
                    return "stop"
        if (p.max_tokens is not None and n_out >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
            return "length"
        return None
