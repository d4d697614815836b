"""``swiftkv bench MODEL --workload ...``: one offline workload on several systems, interleaved
(A B C A B C ...), with throughput, prefill rate, TTFT/TPOT, KV bytes, FLOP/s and MFU."""

from __future__ import annotations

import os
import resource
import statistics

from swiftkv.bench.flops import decode_flops, prefill_flops
from swiftkv.bench.workloads import Workload, uses_prefix_caching

def workload_flops(config, skv, w: Workload, swiftkv: bool, block_size: int = 16) -> float:
    """FLOPs the workload needs; with prefix caching (shared-prefix) the full blocks a prompt shares
    with an earlier one are counted once, as a cache computes them."""
    caching = uses_prefix_caching(w.name)
    total = sum(prefill_flops(config, skv, len(p), swiftkv, _cached(w.prompts[:i], p, block_size) if caching else 0)
                for i, p in enumerate(w.prompts))
    for p in w.prompts:  # decode tokens after the first (sampled from the prefill logits)
        total += sum(decode_flops(config, len(p) + i) for i in range(1, w.max_tokens))
    return total


def _cached(earlier: list[list[int]], prompt: list[int], block_size: int) -> int:
    """Tokens of ``prompt`` in full blocks it shares with an earlier prompt (at most all but the last)."""
    best = max((len(os.path.commonprefix([e, prompt])) for e in earlier), default=0)  # works on any sequences
    return min(best, len(prompt) - 1) // block_size * block_size


def summarise(raw: list[dict], w: Workload, flops: float, peak: float) -> dict:
    wall = statistics.median(r["wall_s"] for r in raw)
    run = min(raw, key=lambda r: abs(r["wall_s"] - wall))

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]

    return {
        "wall_s": wall, "requests_per_s": len(w.prompts) / wall,
        "output_tokens_per_s": w.output_tokens / wall,
        "total_tokens_per_s": (w.prompt_tokens + w.output_tokens) / wall,
        "prefill_tokens_per_s": w.prompt_tokens / max(run["ttft"]),  # all prompts done by the last first token
        "ttft_p50_s": pct(run["ttft"], 50), "ttft_p99_s": pct(run["ttft"], 99),
        "tpot_p50_s": pct(run["tpot"], 50), "tpot_p99_s": pct(run["tpot"], 99),
        "gflops_per_s": flops / wall / 1e9, "mfu": flops / wall / peak,
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_offline_bench(model: str | None, workload: Workload | str, reps: int = 2, dtype: str = "auto",
                      out_dir: str | None = None, with_transformers: bool = True, max_num_seqs: int = 16,
                      kv_budget_gb: float = 1.0, seed: int = 0, peers=None, speculative_config: str | None = None) -> dict:
    """Run ``workload`` on swiftkv (SwiftKV), swiftkv (baseline), transformers and the installed
    peers (``peers``: a :class:`~swiftkv.bench.peers.PeerSpec`), interleaved; with ``speculative_config``
    (JSON) also swiftkv with that speculative decoding (and each vLLM and llama.cpp peer with its own)."""
    from pathlib import Path

    from swiftkv.bench.env import environment, warn_if_busy
    from swiftkv.bench.flops import measure_matmul_peak
    from swiftkv.bench.interleave import interleave
    from swiftkv.bench.peers import start_peers
    from swiftkv.bench.report import format_table, plot, ratio_lines, write_json
    from swiftkv.bench.systems import TransformersSystem, load_transformers_model, swiftkv_systems
    from swiftkv.models.arch import kv_bytes_per_token
    from swiftkv.platforms import dtype_name, resolve_dtype

    dtype = dtype_name(resolve_dtype(dtype))  # "auto" -> this machine's fastest; every system runs it
    env = environment(dtype)
    warn_if_busy(env)
    caching = uses_prefix_caching(workload.name if isinstance(workload, Workload) else workload)
    systems = swiftkv_systems(model, dtype, speculative_config, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=2048, enable_prefix_caching=caching)
    m, path = systems["swiftkv"].llm.model, systems["swiftkv"].llm.model_path
    cfg, skv = m.config, m.swiftkv_config
    w = (workload if isinstance(workload, Workload)
         else Workload.make(workload, cfg.vocab_size, seed, tokenizer=systems["swiftkv"].llm.tokenizer))
    if with_transformers:
        systems["transformers"] = TransformersSystem(load_transformers_model(path, m.compute_dtype),
                                                     dtype, max_num_seqs)
    max_len = max(len(p) for p in w.prompts) + w.max_tokens + 16
    running = start_peers(peers, path, env["threads"], max_len, max_num_seqs, out_dir, dtype, caching) if peers else {}
    systems.update(running)
    failed: dict[str, str] = {}  # systems that failed for good (a peer crashed or hung): reported, not fatal
    try:
        warm = {name: (lambda s=s: s.run(w.prompts[:1], 2)) for name, s in systems.items()}
        interleave(warm, 0, "warm-up", failed=failed)  # first-call allocations and thread pools
        peak = measure_matmul_peak(m.compute_dtype)
        runners = {name: (lambda s=s: s.run(w.prompts, w.max_tokens)) for name, s in systems.items()}
        raw = interleave(runners, reps, w.name, warmup=False, failed=failed)  # warmed up above, on a small run
        # the better of two one-second samples: one taken in a noisy moment made MFU read over 100%
        peak = max(peak, measure_matmul_peak(m.compute_dtype))
    finally:
        for s in systems.values():
            s.close()
    seq_len = w.prompt_tokens / len(w.prompts) + w.max_tokens
    budget = kv_budget_gb * (1 << 30)
    stats = {}
    for name, runs in raw.items():
        swift = name.split("+")[0] in ("swiftkv", "vllm-swiftkv")  # the systems that run the SwiftKV model
        kvb = kv_bytes_per_token(cfg, skv if swift else type(skv).baseline(skv.num_layers), m.compute_dtype)
        stats[name] = {**summarise(runs, w, workload_flops(cfg, skv, w, swift), peak),
                         "kv_bytes_per_token": kvb, "max_concurrent_seqs": int(budget // (kvb * seq_len))}
    result = {"env": env, "model": str(path), "workload": w.name,
              "requests": len(w.prompts), "prompt_tokens": w.prompt_tokens, "output_tokens": w.output_tokens,
              "swiftkv": {"L": skv.num_layers, "l": skv.num_key_value_layers, "G": skv.key_value_group_size},
              "versions": {name: p.version for name, p in running.items()},
              "dtypes": {name: s.dtype for name, s in systems.items()},
              "matmul_peak_gflops": peak / 1e9, "peak_rss_mb": peak_rss_mb(), "kv_budget_gb": kv_budget_gb,
              "systems": stats, "failed": failed}
    if "swiftkv+ngram" in systems:  # how often the drafts hit (all runs, warm-up included)
        s = systems["swiftkv+ngram"].llm.engine.spec_stats
        result["spec_decode"] = {"config": speculative_config, "acceptance_rate": s.acceptance_rate,
                                 "mean_acceptance_length": s.mean_acceptance_length}
    title = (f"{w.name}: {len(w.prompts)} requests, {w.prompt_tokens} prompt / {w.output_tokens} output tokens, "
             f"SwiftKV l={skv.num_key_value_layers}/{skv.num_layers} G={skv.key_value_group_size}; "
             f"{env['dtype']}, {env['threads']} threads, KV cache {env.get('kv_cache_gib', '?')} GiB each, load {env['loadavg_1m']}")
    print(title)
    print("dtypes: " + ", ".join(f"{k} {v}" for k, v in result["dtypes"].items()))
    print(format_table(stats))
    spec_ratios = ratio_lines(stats, "output_tokens_per_s", "swiftkv+ngram")
    print("\n".join(ratio_lines(stats) + spec_ratios + [f"FAILED {name}: {why}" for name, why in failed.items()]))
    if "spec_decode" in result:
        sd = result["spec_decode"]
        print(f"swiftkv+ngram: {sd['acceptance_rate']:.0%} of drafts accepted, "
              f"{sd['mean_acceptance_length']:.2f} tokens per verification step")
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(result, out / f"bench_{w.name}.json")
        plot(stats, title, out / f"bench_{w.name}.png")
        print(f"wrote {out}/bench_{w.name}.json and .png")
    return result
