"""``swiftkv bench prefill``: prefill and batch-1 decode throughput of swiftkv (SwiftKV mode),
swiftkv (baseline mode, same engine with l = L) and transformers (eager), interleaved so a noisy
machine affects all alike. Reports tokens/s and ratios; writes JSON.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from swiftkv.bench.env import environment, warn_if_busy
from swiftkv.sampling_params import SamplingParams


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _hf_model(path: Path, dtype: torch.dtype):
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


def run_prefill_bench(model: str | None = None, lengths: tuple[int, ...] = (512, 2048), reps: int = 3,
                      decode_tokens: int = 64, dtype: str = "bfloat16", out: str | None = None,
                      with_transformers: bool = True) -> dict:
    from swiftkv.llm import LLM

    env = environment(dtype)
    warn_if_busy(env)
    max_len = max(lengths)
    kw = dict(dtype=dtype, max_num_batched_tokens=max(max_len, 2048), max_num_seqs=8)
    systems = {"swiftkv": LLM(model, swiftkv=True, **kw)}
    systems["baseline"] = LLM(systems["swiftkv"].model_path, swiftkv=False, **kw)
    hf = _hf_model(systems["swiftkv"].model_path, systems["swiftkv"].model.model.embed_tokens.weight.dtype) if with_transformers else None
    skv = systems["swiftkv"].model.swiftkv_config
    g = torch.Generator().manual_seed(0)
    vocab = systems["swiftkv"].model.config.vocab_size
    one = SamplingParams(temperature=0, max_tokens=1)
    result = {"env": env, "model": str(systems["swiftkv"].model_path),
              "swiftkv": {"L": skv.num_layers, "l": skv.num_key_value_layers, "G": skv.key_value_group_size},
              "kv_bytes_per_token": {name: llm.engine.kv_bytes_per_token for name, llm in systems.items()},
              "prefill": {}, "decode": {}}

    def run_hf_prefill(ids):
        with torch.inference_mode():
            hf(torch.tensor([ids]), logits_to_keep=1, use_cache=False)

    for n in lengths:
        prompt = torch.randint(100, vocab, (n,), generator=g).tolist()
        times: dict[str, list[float]] = {"swiftkv": [], "baseline": [], "transformers": []}
        runners = {name: (lambda llm=llm: llm.generate(prompt_token_ids=[prompt], sampling_params=one))
                   for name, llm in systems.items()}
        if hf is not None:
            runners["transformers"] = lambda: run_hf_prefill(prompt)
        for fn in runners.values():  # warm-up
            fn()
        for _ in range(reps):  # interleaved A B C A B C ...
            for name, fn in runners.items():
                times[name].append(_timed(fn))
        result["prefill"][n] = {name: n / statistics.median(t) for name, t in times.items() if t}

    prompt = torch.randint(100, vocab, (64,), generator=g).tolist()
    gen = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    dec_runners = {name: (lambda llm=llm: llm.generate(prompt_token_ids=[prompt], sampling_params=gen))
                   for name, llm in systems.items()}
    if hf is not None:
        def hf_generate():
            with torch.inference_mode():
                hf.generate(torch.tensor([prompt]), max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                            do_sample=False)
        dec_runners["transformers"] = hf_generate
    dec_times: dict[str, list[float]] = {k: [] for k in dec_runners}
    for _ in range(2):
        for name, fn in dec_runners.items():
            dec_times[name].append(_timed(fn))
    # decode tokens/s of a whole generate() (prefill of a 64-token prompt included, as users see it)
    result["decode"] = {name: decode_tokens / min(t) for name, t in dec_times.items()}
    result["ratios"] = _ratios(result)
    print(format_report(result))
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    return result


def _ratios(r: dict) -> dict:
    ratios = {}
    for n, tps in r["prefill"].items():
        ratios[f"prefill_{n}_swiftkv_over_baseline"] = tps["swiftkv"] / tps["baseline"]
        if "transformers" in tps:
            ratios[f"prefill_{n}_baseline_over_transformers"] = tps["baseline"] / tps["transformers"]
            ratios[f"prefill_{n}_swiftkv_over_transformers"] = tps["swiftkv"] / tps["transformers"]
    d = r["decode"]
    if "transformers" in d:
        ratios["decode_b1_swiftkv_over_transformers"] = d["swiftkv"] / d["transformers"]
        ratios["decode_b1_baseline_over_transformers"] = d["baseline"] / d["transformers"]
    return ratios


def format_report(r: dict) -> str:
    e = r["env"]
    s = r["swiftkv"]
    lines = [f"model {r['model']} (SwiftKV l={s['l']} of L={s['L']}, G={s['G']}), dtype {e['dtype']}, "
             f"threads {e['threads']}, torch {e['torch']}, load {e['loadavg_1m']}",
             f"{'metric':<28}{'swiftkv':>12}{'baseline':>12}{'transformers':>14}"]
    for n, tps in r["prefill"].items():
        lines.append(f"{f'prefill tok/s @ {n}':<28}" + "".join(
            f"{tps.get(k, float('nan')):>{w}.0f}" for k, w in (("swiftkv", 12), ("baseline", 12), ("transformers", 14))))
    d = r["decode"]
    lines.append(f"{'decode tok/s (batch 1)':<28}" + "".join(
        f"{d.get(k, float('nan')):>{w}.1f}" for k, w in (("swiftkv", 12), ("baseline", 12), ("transformers", 14))))
    kv = r["kv_bytes_per_token"]
    lines.append(f"{'KV bytes/token':<28}{kv['swiftkv']:>12}{kv['baseline']:>12}")
    lines += [f"  {k}: {v:.2f}x" for k, v in r["ratios"].items()]
    return "\n".join(lines)
