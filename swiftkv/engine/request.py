"""One client request: a prompt, its sampling parameters and its ``n`` sample sequences (vLLM
v1's parent request). The engine owns ``n``: it fans a request out into sequences and gathers
their completions back into one :class:`~swiftkv.outputs.RequestOutput`."""

from __future__ import annotations

from dataclasses import dataclass, field

from swiftkv.engine.sequence import Sequence
from swiftkv.outputs import CompletionOutput, Logprob, RequestOutput
from swiftkv.sampling_params import SamplingParams


@dataclass
class Request:
    request_id: str
    prompt: str | None  # the text, when the client sent text
    prompt_token_ids: list[int]
    params: SamplingParams  # as the client asked (``n`` samples)
    seqs: list[Sequence] = field(default_factory=list)  # seqs[i] produces completion i
    prompt_logprobs: list[Logprob | None] | None = None

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def output(self, texts: list[str]) -> RequestOutput:
        """Cumulative output: one completion per sequence (``texts[i]``: sequence i's text so far)."""
        completions = []
        for i, (seq, text) in enumerate(zip(self.seqs, texts)):
            logprobs = None
            if seq.params.logprobs is not None:
                logprobs = [Logprob(t, lp, top) for t, (lp, top) in zip(seq.output_token_ids, seq.logprobs)]
            completions.append(CompletionOutput(i, text, list(seq.output_token_ids), seq.finish_reason, logprobs))
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, completions, self.is_finished,
                             self.prompt_logprobs)
