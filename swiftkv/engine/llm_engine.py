"""The step loop: add / abort requests, schedule, run, sample, detokenise, stop, stream."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from swiftkv.engine.block_manager import BlockManager
from swiftkv.engine.detokenizer import IncrementalDetokenizer
from swiftkv.engine.model_runner import ModelRunner
from swiftkv.engine.scheduler import Scheduler
from swiftkv.engine.sequence import Sequence
from swiftkv.models.full_sequence import full_logits
from swiftkv.models.llama import LlamaForCausalLM
from swiftkv.outputs import CompletionOutput, Logprob, RequestOutput
from swiftkv.sampling_params import SamplingParams


@dataclass
class EngineConfig:
    """Engine limits. ``kv_cache_memory`` is in bytes; blocks = memory / block bytes."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_memory: int = 1 << 30
    block_size: int = 16
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    seed: int = 0
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes seen before

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_memory", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")


class EngineStepError(RuntimeError):
    """A model step failed; only the requests it touched (``request_ids``) were failed."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"engine step failed for {len(request_ids)} request(s): {cause!r}")
        self.request_ids = request_ids
        self.cause = cause


class LLMEngine:
    """Continuous-batching engine over one model (SwiftKV or baseline mode)."""

    def __init__(self, model: LlamaForCausalLM, tokenizer=None, config: EngineConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        from swiftkv.engine.model_runner import kv_bytes_per_token

        block_bytes = kv_bytes_per_token(model.config, model.active_config,
                                         model.model.embed_tokens.weight.dtype) * config.block_size
        num_blocks = config.kv_cache_memory // block_bytes
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={config.kv_cache_memory} B holds no {block_bytes}-byte KV block")
        self.runner = ModelRunner(model, num_blocks, config.block_size)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        self.seqs: dict[str, Sequence] = {}
        self.prompts: dict[str, str | None] = {}
        self.prompt_logprobs: dict[str, list[Logprob | None]] = {}
        self.generators: dict[str, torch.Generator | None] = {}
        self._global_gen = torch.Generator().manual_seed(config.seed)
        self._ids = itertools.count()
        self.eos_token_ids = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        ids = getattr(self.model.config, "eos_token_id", None)
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # -- public API ---------------------------------------------------------------------------

    @property
    def kv_bytes_per_token(self) -> int:
        return self.runner.kv_bytes_per_token

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, prompt: str | None = None) -> str:
        """Queue a request; returns its id. Raises ``ValueError`` for impossible requests."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_request(prompt_token_ids, params)
        seq = Sequence(request_id, list(prompt_token_ids), params, arrival=time.monotonic())
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
        self.scheduler.add(seq)
        self.seqs[request_id] = seq
        self.prompts[request_id] = prompt
        self.generators[request_id] = (torch.Generator().manual_seed(params.seed) if params.seed is not None
                                       else None if params.greedy else self._global_gen)
        if params.prompt_logprobs is not None:
            self.prompt_logprobs[request_id] = self._prompt_logprobs(seq.prompt_token_ids, params.prompt_logprobs)
        return request_id

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ``ValueError`` if the request can never run (thread-safe: reads only config)."""
        vocab = self.model.config.vocab_size
        if not prompt_token_ids:
            raise ValueError("prompt is empty: at least one token is needed")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        n = len(prompt_token_ids)
        if n >= self.max_model_len:
            raise ValueError(f"prompt has {n} tokens; the model's context is {self.max_model_len} tokens")
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context "
                             f"of {self.max_model_len} tokens; lower max_tokens to at most {self.max_model_len - n}")
        longest = n + (params.max_tokens if params.max_tokens is not None else self.max_model_len - n)
        blocks = -(-min(longest, self.max_model_len) // self.config.block_size)
        if blocks > self.block_manager.num_blocks:  # it could never finish, even alone
            raise ValueError(f"prompt + max_tokens ({longest} tokens) needs {blocks} KV blocks but the cache has only "
                             f"{self.block_manager.num_blocks}; raise kv_cache_memory or lower max_tokens")

    def abort_request(self, request_id: str) -> None:
        """Stop a request now, free its KV blocks and forget it (unknown ids are ignored)."""
        seq = self.seqs.get(request_id)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")
        self._release(request_id)

    def _release(self, request_id: str) -> None:
        for d in (self.seqs, self.prompts, self.prompt_logprobs, self.generators):
            d.pop(request_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use stay valid; nothing is recomputed)."""
        self.block_manager.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return outputs of requests that advanced or finished."""
        out = self.scheduler.schedule()
        if not out:
            return []
        try:
            results = self.runner.execute(out, self.generators)
        except Exception as e:  # fail only the requests of this batch; the engine keeps serving
            for seq in out.seqs:
                self.scheduler.finish(seq, "error")
                self._release(seq.seq_id)
            raise EngineStepError([s.seq_id for s in out.seqs], e) from e
        self.scheduler.update_after_step(out)
        outputs = []
        for seq, token, lp in results:
            seq.token_ids.append(token)
            if lp is not None:
                seq.logprobs.append(lp)
            if seq.detokenizer is not None:
                seq.detokenizer.update([token])
            reason = self._check_stop(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                if seq.detokenizer is not None:
                    seq.detokenizer.flush()  # the final text equals a full decode of the output
            outputs.append(self.output_of(seq.seq_id))
        return outputs

    def output_of(self, request_id: str, release: bool = True) -> RequestOutput:
        """The current (cumulative) output of a request; finished requests are forgotten."""
        seq = self.seqs[request_id]
        text = self._text(seq)
        logprobs = None
        if seq.params.logprobs is not None:
            toks = seq.output_token_ids
            logprobs = [Logprob(t, lp, top) for t, (lp, top) in zip(toks, seq.logprobs)]
        completion = CompletionOutput(0, text, list(seq.output_token_ids), seq.finish_reason, logprobs)
        result = RequestOutput(request_id, self.prompts.get(request_id), seq.prompt_token_ids, [completion],
                               seq.is_finished, self.prompt_logprobs.get(request_id))
        if seq.is_finished and release:
            self._release(request_id)
        return result

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _raw_text(seq: Sequence) -> str:
        """Detokenised output so far (incremental: an incomplete trailing character is held back)."""
        return seq.detokenizer.text if seq.detokenizer is not None else ""

    def _text(self, seq: Sequence) -> str:
        text = self._raw_text(seq)
        for s in seq.params.stop:
            if (cut := text.find(s)) != -1:
                text = text[:cut]
        return text

    def _check_stop(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        n_out = seq.num_tokens - seq.num_prompt_tokens
        if n_out >= p.min_tokens:
            if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
                return "stop"
            if p.stop and any(s in self._raw_text(seq) for s in p.stop):
                return "stop"
        if (p.max_tokens is not None and n_out >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _prompt_logprobs(self, prompt: list[int], k: int) -> list[Logprob | None]:
        """Prompt logprobs from the full-sequence path (exact in SwiftKV mode too)."""
        lp = torch.log_softmax(full_logits(self.model, [prompt])[0], -1)  # [T, vocab]
        out: list[Logprob | None] = [None]
        for t in range(1, len(prompt)):
            top = lp[t - 1].topk(k) if k else None
            alts = dict(zip(top.indices.tolist(), top.values.tolist())) if top is not None else {}
            out.append(Logprob(prompt[t], float(lp[t - 1, prompt[t]]), alts))
        return out
