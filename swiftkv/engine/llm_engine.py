"""The step loop: add / abort requests, schedule, run, sample, detokenise, stop, stream."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace

import torch

from swiftkv.engine.block_manager import BlockManager
from swiftkv.engine.detokenizer import IncrementalDetokenizer
from swiftkv.engine.model_runner import ModelRunner
from swiftkv.engine.request import Request
from swiftkv.engine.scheduler import Scheduler
from swiftkv.engine.sequence import Sequence
from swiftkv.engine.stop_checker import StopChecker, output_text
from swiftkv.engine.spec_decode import NgramProposer, SpecDecodingStats, SpeculativeConfig, StepCost
from swiftkv.layers.sampler import top_logprobs
from swiftkv.models.arch import kv_bytes_per_token
from swiftkv.models.full_sequence import full_logits
from swiftkv.models.llama import LlamaForCausalLM
from swiftkv.outputs import Logprob, RequestOutput
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
    # once a step holds prompt tokens, another waiting prompt joins only within this many (None: the budget
    # alone): a server's oldest prompt gets its first token sooner (`swiftkv serve` uses 256)
    prefill_batch_tokens: int | None = None
    # prompt-lookup speculative decoding (vLLM's --speculative-config syntax: a JSON string, dict or config); None: off
    speculative_config: SpeculativeConfig | str | dict | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_memory", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)


class EngineStepError(RuntimeError):
    """A model step failed; only the requests it touched (``request_ids``) were failed. When only some rows
    failed (their sampling parameters made no finite distribution), ``outputs`` holds the step's outputs of the
    other requests, which went on."""

    def __init__(self, request_ids: list[str], cause: BaseException,
                 outputs: list[RequestOutput] | None = None) -> None:
        super().__init__(f"engine step failed for {len(request_ids)} request(s): {cause!r}")
        self.outputs = outputs or []
        self.request_ids = request_ids
        self.cause = cause


class LLMEngine:
    """Continuous-batching engine over one model prepared for inference (``load_model(..., for_inference=True)``
    or ``model.prepare_for_inference()``; the engine never changes it), in SwiftKV or baseline mode (``swiftkv``;
    None: the model's default path). Engines in either mode can share one model (its weights are held once)."""

    def __init__(self, model: LlamaForCausalLM, tokenizer=None, config: EngineConfig | None = None,
                 swiftkv: bool | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        self.swiftkv = model.default_swiftkv if swiftkv is None else swiftkv
        block_bytes = kv_bytes_per_token(model.config, model.layout(self.swiftkv), model.compute_dtype) * config.block_size
        num_blocks = config.kv_cache_memory // block_bytes
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={config.kv_cache_memory} B holds no {block_bytes}-byte KV block")
        self.eos_token_ids = self._eos_ids()
        self.runner = ModelRunner(model, num_blocks, config.block_size, self.swiftkv, self.eos_token_ids)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.prefill_batch_tokens)
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        self.stop_checker = StopChecker(self.eos_token_ids, self.max_model_len)
        self.requests: dict[str, Request] = {}
        # generators live where the logits do (a CPU generator cannot sample CUDA tensors)
        self._global_gen = torch.Generator(self.runner.device).manual_seed(config.seed)
        spec = config.speculative_config
        self.proposer = NgramProposer(spec) if spec is not None else None
        self.spec_stats = SpecDecodingStats()
        self.step_cost = StepCost()  # decode steps' time against their rows: what a draft row costs here
        self._ids = itertools.count()

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
                    request_id: str | None = None, prompt: str | None = None, cache_salt: str | None = None) -> str:
        """Queue a request (``params.n`` samples, one sequence each); returns its id. Raises
        ``ValueError`` for impossible requests. Sample ``i`` of a seeded request uses seed + i. ``cache_salt``
        (vLLM's): the request shares prefix-cache blocks only with requests of the same salt (tenants)."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_request(prompt_token_ids, params)
        req = Request(request_id, prompt, list(prompt_token_ids), params)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = self._prompt_logprobs(req.prompt_token_ids, params.prompt_logprobs)
        for i in range(params.n):
            p = params if params.n == 1 else replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            seq = Sequence(f"{request_id}#{i}", req.prompt_token_ids, p, arrival=time.monotonic(),
                           request_id=request_id, cache_salt=cache_salt)
            seq.generator = (torch.Generator(self.runner.device).manual_seed(p.seed) if p.seed is not None
                             else None if p.greedy else self._global_gen)
            if self.tokenizer is not None:
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens)
            req.seqs.append(seq)
        for seq in req.seqs:
            self.scheduler.add(seq)
        self.requests[request_id] = req
        return request_id

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ``ValueError`` if the request can never run (thread-safe: reads only config)."""
        vocab = self.model.config.vocab_size
        if not prompt_token_ids:
            raise ValueError("prompt is empty: at least one token is needed")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if params.min_tokens:
            stops = params.stop_ids(self.eos_token_ids)
            if len(stops) >= vocab and all(t in stops for t in range(vocab)):
                raise ValueError("stop_token_ids (with the eos tokens) cover the whole vocabulary: nothing can be "
                                 "sampled before min_tokens; drop min_tokens or some stop_token_ids")
        if params.num_speculative_tokens:
            spec = self.config.speculative_config
            if spec is None:
                raise ValueError("num_speculative_tokens needs an engine with speculative decoding (--speculative-config "
                                 "for the server, speculative_config for LLM); leave it out or set it to 0")
            if params.num_speculative_tokens > spec.num_speculative_tokens:
                raise ValueError(f"num_speculative_tokens ({params.num_speculative_tokens}) exceeds the engine's "
                                 f"num_speculative_tokens ({spec.num_speculative_tokens}); ask for at most that")
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
        req = self.requests.pop(request_id, None)
        for seq in req.seqs if req is not None else []:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use stay valid; nothing is recomputed)."""
        self.block_manager.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return the (cumulative) outputs of requests that advanced."""
        out = self.scheduler.schedule()
        if not out:
            return []
        try:
            started = time.perf_counter()
            results, row_errors = self.runner.execute(out)
            if self.proposer is not None and all(n == 1 + len(s.spec_token_ids) for s, n in zip(out.seqs, out.num_tokens)):
                self.step_cost.add(out.total_tokens, time.perf_counter() - started)  # decodes and verifications only
        except Exception as e:  # fail only the requests of this batch; the engine keeps serving
            failed = list(dict.fromkeys(s.request_id for s in out.seqs))
            self._fail(failed)
            raise EngineStepError(failed, e) from e
        failed = list(dict.fromkeys(seq.request_id for seq, _ in row_errors))  # one request's row: it alone fails
        self._fail(failed)
        advanced: dict[str, None] = {}
        stopped: list[tuple[Sequence, str]] = []
        rejected = dict.fromkeys(map(id, out.seqs), 0)  # draft tokens whose KV is rolled back
        for seq, tokens, lps in results:
            if seq.request_id in failed:  # another of its n samples failed
                continue
            rejected[id(seq)] = self._count_drafts(seq, tokens)
            if (reason := self._append(seq, tokens, lps)) is not None:
                stopped.append((seq, reason))
            advanced[seq.request_id] = None
        # after the appends (prefix-cache hashes read the accepted tokens), before finishing (their blocks are cached)
        self.scheduler.update_after_step(out, [rejected[id(s)] for s in out.seqs])
        for seq, reason in stopped:
            self.scheduler.finish(seq, reason)
            if seq.detokenizer is not None:
                seq.detokenizer.flush()  # the final text equals a full decode of the output
        if self.proposer is not None:
            row_cost = self.step_cost.row_cost(len(self.scheduler.running))
            for seq, _, _ in results:
                if not seq.is_finished:
                    self._propose(seq, row_cost)
        outputs = [self.output_of(rid) for rid in advanced]
        if failed:
            raise EngineStepError(failed, ValueError("; ".join(dict.fromkeys(why for _, why in row_errors))), outputs)
        return outputs

    def _append(self, seq: Sequence, tokens: list[int], lps) -> str | None:
        """Append a step's tokens (and logprobs, text) to ``seq`` up to the first that stops it: why it stops."""
        for j, token in enumerate(tokens):
            seq.token_ids.append(token)
            if lps is not None:
                seq.logprobs.append(lps[j])
            if seq.detokenizer is not None:
                seq.detokenizer.update([token])
            if (reason := self.stop_checker.check(seq, token)) is not None:
                return reason  # the tokens after it are dropped
        return None

    def _count_drafts(self, seq: Sequence, tokens: list[int]) -> int:
        """Count how ``seq``'s drafts fared this step (the engine's counters, its adaptive length): the number
        rejected, whose KV is rolled back."""
        drafted, stats = len(seq.spec_token_ids), seq.draft_stats
        if drafted:
            self.spec_stats.add(drafted, len(tokens) - 1)
            stats.observe(drafted, len(tokens) - 1)
        elif stats.unverified is not None:  # a proposal not worth verifying: did it hit?
            stats.observe(1, int(tokens[:1] == [stats.unverified]))
        return drafted - (len(tokens) - 1) if drafted else 0

    def _propose(self, seq: Sequence, row_cost: float) -> None:
        """The drafts ``seq`` verifies next step: the proposer's, cut to what pays (adaptive) and what fits."""
        drafts = self.proposer.propose(seq.token_ids, self._max_drafts(seq))
        stats = seq.draft_stats
        k = stats.length(len(drafts), row_cost) if self.config.speculative_config.adaptive else len(drafts)
        seq.spec_token_ids = drafts[:k]
        stats.unverified = drafts[0] if drafts and not k else None

    def _max_drafts(self, seq: Sequence) -> int:
        """Drafts the next step may verify: all of them and the token after must fit max_tokens and the context."""
        left = self.max_model_len - seq.num_tokens
        if seq.params.max_tokens is not None:
            left = min(left, seq.params.max_tokens - (seq.num_tokens - seq.num_prompt_tokens))
        asked = seq.params.num_speculative_tokens
        return min(left - 1, asked) if asked is not None else left - 1

    def _fail(self, request_ids: list[str]) -> None:
        """Finish every sequence of these requests with ``error`` (blocks freed) and forget them."""
        for rid in request_ids:
            for seq in self.requests.pop(rid).seqs:
                if not seq.is_finished:
                    self.scheduler.finish(seq, "error")

    def output_of(self, request_id: str, release: bool = True) -> RequestOutput:
        """The current (cumulative) output of a request; finished requests are forgotten."""
        req = self.requests[request_id]
        result = req.output([output_text(seq) for seq in req.seqs])
        if req.is_finished and release:
            del self.requests[request_id]
        return result

    # -- helpers ------------------------------------------------------------------------------

    def _prompt_logprobs(self, prompt: list[int], k: int) -> list[Logprob | None]:
        """Prompt logprobs from the full-sequence path (exact in SwiftKV mode too)."""
        lp = torch.log_softmax(full_logits(self.model, [prompt], swiftkv=self.swiftkv)[0], -1)  # [T, vocab]
        return [None] + [Logprob(prompt[t], float(lp[t - 1, prompt[t]]), top_logprobs(lp[t - 1], k))
                         for t in range(1, len(prompt))]
