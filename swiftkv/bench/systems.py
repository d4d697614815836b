"""Systems under test: anything with ``run(prompts, max_tokens) -> {"wall_s", "ttft", "tpot"}``,
``close()``, a ``name`` and the ``dtype`` it runs. swiftkv's engine (SwiftKV or baseline mode) and
transformers live here; vLLM and llama.cpp run out of process (:class:`~swiftkv.bench.peers.Peer`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import torch

from swiftkv.bench.env import KV_CACHE_GIB
from swiftkv.sampling_params import SamplingParams


class System(Protocol):
    name: str
    dtype: str

    def run(self, prompts: list[list[int]], max_tokens: int) -> dict:
        """Generate ``max_tokens`` greedy tokens per prompt (all at once); returns ``wall_s`` and
        per-request ``ttft`` / ``tpot`` in seconds."""
        ...

    def close(self) -> None: ...


class EngineSystem:
    """swiftkv's own engine; ``llm.swiftkv`` says which mode. The prefix cache is emptied before
    every run, so each starts cold (as the peers' do)."""

    def __init__(self, name: str, llm, dtype: str) -> None:
        self.name, self.llm, self.dtype = name, llm, dtype

    def run(self, prompts: list[list[int]], max_tokens: int) -> dict:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        eng = self.llm.engine
        eng.reset_prefix_cache()
        t0 = time.perf_counter()
        ids = [eng.add_request(p, params) for p in prompts]
        first: dict[str, float] = {}
        done: dict[str, float] = {}
        while eng.has_unfinished_requests():
            outs = eng.step()
            now = time.perf_counter()
            for o in outs:
                first.setdefault(o.request_id, now)
                if o.finished:
                    done[o.request_id] = now
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "ttft": [first[i] - t0 for i in ids],
                "tpot": [(done[i] - first[i]) / max(1, max_tokens - 1) for i in ids]}

    def close(self) -> None:
        pass


def load_transformers_model(path: Path, dtype: torch.dtype):
    """The original model in plain transformers (SwiftKV tensors, if any, are ignored)."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM, logging

    from swiftkv.models.loader import load_config

    config = load_config(path)
    cls = Qwen2ForCausalLM if config.model_type.startswith("qwen2") else LlamaForCausalLM
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # unused *_swiftkv tensors are expected
    try:
        return cls.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    finally:
        logging.set_verbosity(verbosity)


class TransformersSystem:
    """transformers ``generate()`` (eager, SDPA) in left-padded batches of ``batch_size``; TTFT from a
    1-token generate of the same batch. ``max_tokens == 1`` is one forward (logits of the last token)."""

    name = "transformers"

    def __init__(self, hf, dtype: str, batch_size: int) -> None:
        self.hf, self.dtype, self.batch_size = hf, dtype, batch_size

    def run(self, prompts: list[list[int]], max_tokens: int) -> dict:
        ttft, tpot, wall = [], [], 0.0
        pad = self.hf.generation_config.pad_token_id or self.hf.config.eos_token_id or 0
        pad = pad[0] if isinstance(pad, list) else pad
        for s in range(0, len(prompts), self.batch_size):
            batch = prompts[s : s + self.batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])  # [B, T], left-padded
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            kw = dict(attention_mask=mask, do_sample=False, pad_token_id=pad)
            with torch.inference_mode():
                t = time.perf_counter()
                if max_tokens == 1:
                    self.hf(ids, attention_mask=mask, logits_to_keep=1, use_cache=False)
                    first = total = time.perf_counter() - t
                else:  # first token and the rest timed in one call (a difference of two runs can be < 0)
                    clock = _FirstTokenClock()
                    self.hf.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, streamer=clock, **kw)
                    total = time.perf_counter() - t
                    first = clock.first - t
            wall += total
            ttft += [wall - total + first] * len(batch)
            tpot += [(total - first) / max(1, max_tokens - 1)] * len(batch)
        return {"wall_s": wall, "ttft": ttft, "tpot": tpot}

    def close(self) -> None:
        pass


def swiftkv_systems(model, dtype: str, speculative_config: str | None = None, **llm_kw) -> dict[str, EngineSystem]:
    """swiftkv in SwiftKV mode and in baseline mode (the same engine with l = L), one checkpoint loaded once:
    the two engines share its weights, each with a KV cache of its own. With ``speculative_config`` (JSON) a
    third, ``swiftkv+ngram``: SwiftKV mode with prompt-lookup speculative decoding."""
    from dataclasses import replace

    from swiftkv.engine.spec_decode import SpeculativeConfig
    from swiftkv.llm import LLM

    spec = SpeculativeConfig.parse(speculative_config)  # a bad config is refused before anything loads
    llm_kw.setdefault("kv_cache_memory", KV_CACHE_GIB << 30)  # as much as the peers get
    swift = LLM(model, swiftkv=True, dtype=dtype, **llm_kw)
    base = LLM.from_model(swift.model, swift.tokenizer, swift.model_path, swift.engine.config, swiftkv=False)
    systems = {"swiftkv": EngineSystem("swiftkv", swift, dtype), "baseline": EngineSystem("baseline", base, dtype)}
    if spec is not None:
        config = replace(swift.engine.config, speculative_config=spec)
        spec_llm = LLM.from_model(swift.model, swift.tokenizer, swift.model_path, config, swiftkv=True)
        systems["swiftkv+ngram"] = EngineSystem("swiftkv+ngram", spec_llm, dtype)
    return systems


class _FirstTokenClock:
    """A ``generate`` streamer that notes when the first new token arrives (``put`` gets the prompt first)."""

    def __init__(self) -> None:
        self.calls, self.first = 0, float("nan")

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass
