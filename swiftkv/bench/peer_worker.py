"""A benchmark peer (vLLM, llama.cpp or OpenVINO GenAI) in its own interpreter, driven over stdin/stdout.

Standalone on purpose: it imports only the standard library and the peer, so it runs in the
peer's own virtual environment (``/path/to/venv/bin/python peer_worker.py vllm MODEL``), which
need not have swiftkv installed. ``swiftkv.bench.peers`` starts it, keeps it alive across the
interleaved repetitions, and sends one JSON line per run::

    {"prompts": [[token ids], ...], "max_tokens": 32}

Every answer is one stdout line ``@@swiftkv-peer {json}`` (the peer's own logging goes wherever
it likes; the parent ignores other lines): first ``{"ready": true, "version": ...}``, then per
run ``{"wall_s", "ttft": [...], "tpot": [...], "output_tokens": [...]}`` or ``{"error": "..."}``.
Greedy decoding, ``max_tokens`` tokens per request whatever the model samples (EOS ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

TAG = "@@swiftkv-peer "


def reply(obj: dict) -> None:
    sys.stdout.write(TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


class VLLMPeer:
    """vLLM's offline ``LLM.generate`` with all requests at once (its scheduler batches them).

    TTFT: a ``max_tokens=1`` pass over the same requests (all prompts prefilled); TPOT: the rest
    of the full pass spread over the remaining tokens (what the transformers runner reports too).
    Prefix caching is off, so repeated prompts are really prefilled again."""

    def __init__(self, model: str, threads: int, max_model_len: int, max_num_seqs: int, dtype: str,
                 prefix_caching: bool = False, speculative_config: dict | None = None) -> None:
        import vllm
        from vllm import LLM

        self.version = vllm.__version__
        self.prefix_caching = prefix_caching
        self.llm = LLM(model=model, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max(max_model_len, 2048), enable_prefix_caching=prefix_caching, seed=0,
                       speculative_config=speculative_config)

    def _generate(self, prompts: list[list[int]], max_tokens: int):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True)
        return self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    def run(self, prompts: list[list[int]], max_tokens: int) -> dict:
        if self.prefix_caching:
            self.llm.reset_prefix_cache()  # each run starts cold
        t = time.perf_counter()
        outs = self._generate(prompts, 1)
        first = time.perf_counter() - t
        if max_tokens == 1:
            return {"wall_s": first, "ttft": [first] * len(prompts), "tpot": [0.0] * len(prompts),
                    "output_tokens": [len(o.outputs[0].token_ids) for o in outs]}
        if self.prefix_caching:
            self.llm.reset_prefix_cache()  # the full pass must not reuse the 1-token pass's prompts
        t = time.perf_counter()
        outs = self._generate(prompts, max_tokens)
        wall = time.perf_counter() - t
        tpot = max(0.0, wall - first) / max(1, max_tokens - 1)
        return {"wall_s": wall, "ttft": [first] * len(prompts), "tpot": [tpot] * len(prompts),
                "output_tokens": [len(o.outputs[0].token_ids) for o in outs]}


class LlamaCppPeer:
    """llama-cpp-python: one sequence at a time (its high-level API has no batching), so request
    ``i`` waits for the ones before it; TTFT counts from the start of the run, as a user sees it. With a
    ``speculative_config`` (vLLM's n-gram keys), its prompt-lookup draft model ``LlamaPromptLookupDecoding``."""

    def __init__(self, model: str, threads: int, max_model_len: int, max_num_seqs: int, dtype: str,
                 prefix_caching: bool = False, speculative_config: dict | None = None) -> None:
        import llama_cpp  # the GGUF's own quantisation decides its dtype

        draft = None
        if speculative_config:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft = LlamaPromptLookupDecoding(num_pred_tokens=speculative_config["num_speculative_tokens"],
                                              max_ngram_size=speculative_config.get("prompt_lookup_max", 4))
        self.version = llama_cpp.__version__
        self.llm = llama_cpp.Llama(model_path=model, n_ctx=max_model_len, n_batch=min(2048, max_model_len),
                                   n_threads=threads, n_threads_batch=threads, verbose=False, seed=0,
                                   draft_model=draft)

    def run(self, prompts: list[list[int]], max_tokens: int) -> dict:
        ttft, tpot, counts = [], [], []
        t0 = time.perf_counter()
        for p in prompts:
            self.llm.reset()  # no reuse of the previous prompt's KV (a fair prefill figure)
            n, first = 0, 0.0
            for _ in self.llm.generate(p, temp=0.0, top_k=1, reset=True):
                n += 1
                if n == 1:
                    first = time.perf_counter()
                    ttft.append(first - t0)
                if n >= max_tokens:
                    break
            tpot.append((time.perf_counter() - first) / max(1, n - 1))
            counts.append(n)
        return {"wall_s": time.perf_counter() - t0, "ttft": ttft, "tpot": tpot, "output_tokens": counts}


class OpenVINOPeer:
    """OpenVINO GenAI's ``LLMPipeline`` on an exported model (what Intel steers Xeon users to), token ids in,
    greedy, computing in ``dtype`` (its ``INFERENCE_PRECISION_HINT``). Prompts of one length run as one batch
    (the decode-batch figure), others one group after another. TTFT and TPOT as for vLLM: a one-token pass,
    then the full pass."""

    def __init__(self, model: str, threads: int, max_model_len: int, max_num_seqs: int, dtype: str,
                 prefix_caching: bool = False) -> None:
        import openvino_genai as ov_genai

        self.version = ov_genai.__version__.split("-")[0]
        hint = {"bfloat16": "bf16", "float32": "f32"}.get(dtype, dtype)
        # an explicit scheduler: without one the pipeline reused the previous call's KV for a repeated prompt
        # (2,048 "prefilled" tokens in 20 ms), which no other system here does
        scheduler = ov_genai.SchedulerConfig()
        scheduler.enable_prefix_caching = prefix_caching
        self.pipe = ov_genai.LLMPipeline(model, "CPU", scheduler_config=scheduler, INFERENCE_NUM_THREADS=threads,
                                         INFERENCE_PRECISION_HINT=hint)

    def _generate(self, prompts: list[list[int]], max_tokens: int) -> list[int]:
        import numpy as np
        import openvino as ov
        import openvino_genai as ov_genai

        counts = []
        for length in dict.fromkeys(len(p) for p in prompts):  # one batch per prompt length, in order
            ids = np.array([p for p in prompts if len(p) == length], dtype=np.int64)
            config = ov_genai.GenerationConfig()
            config.max_new_tokens = config.min_new_tokens = max_tokens
            config.ignore_eos, config.do_sample = True, False
            out = self.pipe.generate(ov_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids))), config)
            counts += [len(t) for t in out.tokens]
        return counts

    def run(self, prompts: list[list[int]], max_tokens: int) -> dict:
        t = time.perf_counter()
        counts = self._generate(prompts, 1)
        first = time.perf_counter() - t
        if max_tokens == 1:
            return {"wall_s": first, "ttft": [first] * len(prompts), "tpot": [0.0] * len(prompts),
                    "output_tokens": counts}
        t = time.perf_counter()
        counts = self._generate(prompts, max_tokens)
        wall = time.perf_counter() - t
        tpot = max(0.0, wall - first) / max(1, max_tokens - 1)
        return {"wall_s": wall, "ttft": [first] * len(prompts), "tpot": [tpot] * len(prompts), "output_tokens": counts}


# vllm-swiftkv: the SwiftKV checkpoint through swiftkv's plugin
PEERS = {"vllm": VLLMPeer, "vllm-swiftkv": VLLMPeer, "llama.cpp": LlamaCppPeer, "openvino": OpenVINOPeer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("backend", choices=sorted(PEERS))
    ap.add_argument("model", help="HF model directory (vLLM), GGUF file (llama.cpp) or exported model (OpenVINO)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", help="vLLM's and OpenVINO's compute dtype (the parent passes swiftkv's)")
    ap.add_argument("--prefix-caching", action="store_true", help="vLLM: prefix caching on (emptied every run)")
    ap.add_argument("--speculative-config", default=None, help="vLLM: its --speculative-config (JSON); llama.cpp: its prompt-lookup "
                    "draft model with num_speculative_tokens and prompt_lookup_max")
    args = ap.parse_args()
    try:
        extra = {"speculative_config": json.loads(args.speculative_config)} if args.speculative_config else {}
        peer = PEERS[args.backend](args.model, args.threads, args.max_model_len, args.max_num_seqs, args.dtype,
                                   args.prefix_caching, **extra)
    except Exception as e:  # reported to the parent, which skips this peer with the reason
        reply({"error": f"{type(e).__name__}: {e}"})
        return
    reply({"ready": True, "version": peer.version})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            reply(peer.run(req["prompts"], int(req["max_tokens"])))
        except Exception as e:
            reply({"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":  # vLLM's CPU workers re-import the main module
    main()
