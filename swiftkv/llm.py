"""``LLM``: the offline Python API (vLLM-shaped) over :class:`~swiftkv.engine.llm_engine.LLMEngine`."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from swiftkv.engine.llm_engine import EngineConfig, EngineStepError, LLMEngine
from swiftkv.models.loader import load_config, load_model, load_tokenizer, parse_dtype
from swiftkv.outputs import RequestOutput
from swiftkv.sampling_params import SamplingParams

RUNTIME_BYTES = 600 << 20  # Python, PyTorch, transformers, the tokenizer: what the process holds before a model


def check_fits(path, dtype: str, kv_cache_memory: int, max_num_batched_tokens: int) -> None:
    """Refuse, before anything is loaded, a model whose weights, KV cache and activations would not fit the
    memory available now (a clear ``ValueError`` instead of the OS killing the process half-way).
    ``SWIFTKV_SKIP_MEMORY_CHECK=1`` skips it."""
    import torch

    from swiftkv.memory import available_bytes
    from swiftkv.models.footprint import held_bytes_estimate
    from swiftkv.models.loader import load_config, parse_dtype

    avail = available_bytes()
    if avail is None or os.environ.get("SWIFTKV_SKIP_MEMORY_CHECK") == "1":
        return
    config = load_config(path)
    dt = parse_dtype(dtype, config)
    weights = held_bytes_estimate(Path(path), dt)
    width = config.hidden_size * 6 + config.intermediate_size * 3  # live activations per batched token
    activations = max_num_batched_tokens * width * torch.empty((), dtype=dt).element_size() + (64 << 20)
    need = weights + kv_cache_memory + activations + RUNTIME_BYTES
    if need > avail:
        gib = (lambda b: f"{b / 2**30:.1f} GiB")
        fixes = [f"lower kv_cache_memory (now {gib(kv_cache_memory)}; --kv-cache-gb for the CLI)"]
        if dt == torch.float32 and held_bytes_estimate(Path(path), torch.bfloat16) < weights:
            fixes.append("compute in bfloat16 (--dtype bfloat16: the checkpoint's fp32 weights are then held in half "
                         "the bytes)")
        fixes.append("free memory, or use a smaller model")
        raise ValueError(f"{path} needs about {gib(need)} (weights {gib(weights)} held for {str(dt).removeprefix('torch.')}, KV cache "
                         f"{gib(kv_cache_memory)}, activations and runtime {gib(activations + RUNTIME_BYTES)}), but "
                         f"{gib(avail)} is available: {'; '.join(fixes)}. (SWIFTKV_SKIP_MEMORY_CHECK=1 loads it anyway.)")


class GenerateError(RuntimeError):
    """Some requests of one :meth:`LLM.generate` call failed (a step that held them raised, or their sampling
    parameters gave no finite distribution); every other request ran to its end. ``outputs``: each prompt's output
    in input order, None where its request failed; ``errors``: prompt index -> the cause."""

    def __init__(self, outputs: list[RequestOutput | None], errors: dict[int, BaseException]) -> None:
        first = min(errors)
        super().__init__(f"{len(errors)} of {len(outputs)} requests failed (prompt {first}: {errors[first]!r}); the "
                         f"other {len(outputs) - len(errors)} completed: their outputs are in this error's .outputs")
        self.outputs, self.errors = outputs, errors


class LLM:
    """Load a model and generate with continuous batching.

    Args:
        model: model directory, hub id, ``smollm2-135m-instruct`` (base) or
            ``smollm2-135m-instruct-swiftkv``; ``None`` is the default SwiftKV model.
        swiftkv: ``True`` SwiftKV path, ``False`` the original model (baseline), ``None`` the
            checkpoint's own mode (an argument of every forward: the model's weights serve both).
        dtype: ``"auto"`` (bf16 only where the CPU has native bf16, else float32), ``"bfloat16"`` or
            ``"float32"``.
        kv_cache_memory: bytes of KV cache to allocate.
        enable_prefix_caching: reuse the KV blocks of prompt prefixes seen before (a cached prefix
            skips every layer, SwiftKV's included).
        prefill_batch_tokens: once a step holds prompt tokens, another waiting prompt joins it only while
            the step's prompt tokens stay within this many (None, the default: only the token budget limits
            them; a server wants a small cap so the oldest prompt's first token comes sooner).
        speculative_config: prompt-lookup speculative decoding in vLLM's syntax (a dict or JSON string such as
            ``{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}``); None (default): off.
            Greedy output is unchanged and sampled output keeps its distribution; it pays where outputs quote
            their prompts (RAG, summaries, extraction, edits).
    """

    def __init__(self, model: str | os.PathLike | None = None, swiftkv: bool | None = None,
                 dtype: str = "auto", max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 kv_cache_memory: int = 1 << 30, block_size: int = 16, max_model_len: int | None = None,
                 seed: int = 0, device: str = "cpu", enable_prefix_caching: bool = True,
                 prefill_batch_tokens: int | None = None, speculative_config: dict | str | None = None) -> None:
        from swiftkv.builtin import resolve_model
        from swiftkv.models.registry import DEFAULT_SWIFTKV_MODEL

        path = resolve_model(DEFAULT_SWIFTKV_MODEL if model is None else model)
        if device == "cpu" and parse_dtype(dtype, load_config(path)) == torch.float16:
            raise ValueError("float16 does not run on the CPU path (its kernels compute in float32 or bfloat16); "
                             "use dtype bfloat16 or float32 (--dtype)")
        if device == "cpu":
            check_fits(path, dtype, kv_cache_memory, max_num_batched_tokens)
        config = EngineConfig(max_num_seqs, max_num_batched_tokens, kv_cache_memory, block_size, max_model_len, seed,
                              enable_prefix_caching, prefill_batch_tokens, speculative_config)  # checked before loading
        self.model, self.model_path = load_model(path, dtype=dtype, device=device, for_inference=True)
        self.tokenizer = load_tokenizer(self.model_path)
        self.engine = LLMEngine(self.model, self.tokenizer, config, swiftkv)
        self._counter = itertools.count()

    @classmethod
    def from_model(cls, model, tokenizer, model_path: str | os.PathLike = "", config: EngineConfig | None = None,
                   swiftkv: bool | None = None) -> LLM:
        """Wrap an already loaded model without reloading it (``swiftkv``: the path to run, None the model's
        default). The model must be prepared for inference (``load_model(..., for_inference=True)`` or
        ``model.prepare_for_inference()``); another ``LLM`` on the same model (the other mode, say) shares its
        weights."""
        llm = cls.__new__(cls)
        llm.model, llm.model_path, llm.tokenizer = model, model_path, tokenizer
        llm.engine = LLMEngine(model, tokenizer, config or EngineConfig(), swiftkv)
        llm._counter = itertools.count()
        return llm

    @property
    def swiftkv(self) -> bool:
        """Whether this LLM runs the SwiftKV path (else the original model's)."""
        return self.engine.swiftkv

    def _encode(self, prompt: str | list[int]) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"], prompt
        if isinstance(prompt, list):
            return list(prompt), None
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _add(self, prompt, params: SamplingParams) -> str:
        ids, text = self._encode(prompt)
        return self.engine.add_request(ids, params, f"req{next(self._counter)}", prompt=text)

    def set_swiftkv(self, enabled: bool) -> None:
        """Switch between the SwiftKV model and the original one, rebuilding the engine (its KV
        cache is sized for one layout; the weights, held once, serve both). Refused while requests are
        in flight."""
        if self.engine.has_unfinished_requests():
            raise ValueError("requests are in flight; switch SwiftKV on or off between generate() calls")
        config, was = self.engine.config, self.engine.swiftkv
        self.model.check_path(enabled)  # before anything is freed
        self.engine = None  # the old KV cache goes before the new one is made; the weights are shared
        try:
            self.engine = LLMEngine(self.model, self.tokenizer, config, enabled)
        except BaseException:
            self.engine = LLMEngine(self.model, self.tokenizer, config, was)
            raise

    def generate(self, prompts: str | list[str] | list[int] | list[list[int]] | None = None,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
                 prompt_token_ids: list[list[int]] | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (strings or token-id lists); results in input order.
        ``sampling_params``: one for every prompt, or a list with one per prompt (as in vLLM). A request that fails
        fails alone: the others run to their end, then :class:`GenerateError` carries every output."""
        if prompt_token_ids is not None:
            prompts = prompt_token_ids
        if prompts is None:
            raise ValueError("give prompts or prompt_token_ids")
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"{len(sampling_params)} sampling_params for {len(prompts)} prompts")
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        rids = [self._add(p, sp) for p, sp in zip(prompts, params)]
        done: dict[str, RequestOutput] = {}
        failed: dict[str, BaseException] = {}
        try:
            with tqdm(total=len(rids), disable=not use_tqdm, desc="generate") as bar:
                while self.engine.has_unfinished_requests():
                    try:
                        outs = self.engine.step()
                    except EngineStepError as e:  # those requests alone failed (the engine dropped them)
                        outs = e.outputs
                        failed.update(dict.fromkeys(e.request_ids, e.cause))
                        bar.update(len(e.request_ids))
                    for out in outs:
                        if out.finished:
                            done[out.request_id] = out
                            bar.update(1)
        finally:  # interrupted (KeyboardInterrupt, ...): no request of this call stays in the engine
            for rid in rids:
                if rid not in done and rid not in failed:
                    self.engine.abort_request(rid)
        if failed:
            raise GenerateError([done.get(rid) for rid in rids],
                                {i: failed[rid] for i, rid in enumerate(rids) if rid in failed})
        return [done[rid] for rid in rids]

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the cumulative output of one request after every step that advanced it."""
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError("stream() supports n=1")
        rid = self._add(prompt, params)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation and generate the reply."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.apply_chat_template(c) for c in convs], sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {self.model_path} has no chat template; use generate()")
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))
