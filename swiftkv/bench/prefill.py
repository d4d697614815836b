"""``swiftkv bench --workload prefill``: prefill and decode throughput of swiftkv (SwiftKV mode),
swiftkv (baseline mode, same engine with l = L), transformers (eager) and, when installed, vLLM and
llama.cpp, interleaved so a noisy machine affects all alike. Reports tokens/s and ratios; writes JSON.
"""

from __future__ import annotations

import os
import random
import statistics
import time

import torch

from swiftkv.bench.env import (
    environment,
    measure_bandwidth,
    measure_bandwidth_apart,
    reset_peak_memory,
    tree_memory,
    warn_if_busy,
)
from swiftkv.bench.flops import amx_peak_gflops, cpu_mhz, measure_matmul_peak, prefill_flops
from swiftkv.bench.interleave import interleave
from swiftkv.bench.systems import (
    TransformersSystem,
    load_transformers_model,
    swiftkv_systems,
)
from swiftkv.bench.workloads import random_token_prompts
from swiftkv.fileio import atomic_write_json
from swiftkv.kernels.linear import int8_dot_available
from swiftkv.models.footprint import checkpoint_bytes, decode_weight_bytes, held_bytes
from swiftkv.platforms import cpu_flags, dtype_name, resolve_dtype


SWIFTKV_SYSTEMS = ("swiftkv", "vllm-swiftkv")  # the systems that run the SwiftKV model (the others: the original)


def _wall(system, prompts: list[list[int]], n: int) -> float:
    return system.run(prompts, n)["wall_s"]


def _tpot(system, prompts: list[list[int]], n: int) -> float:
    """Seconds per output token after the first (decode alone, without the prompt's prefill)."""
    return statistics.median(system.run(prompts, n)["tpot"])


def run_prefill_bench(model: str | None = None, lengths: tuple[int, ...] = (512, 2048), reps: int = 3,
                      decode_tokens: int = 64, dtype: str = "auto", out: str | None = None,
                      with_transformers: bool = True, peers=None, batch: int = 32) -> dict:
    """Prefill tokens/s at each of ``lengths`` (one prompt, first token only), batch-1 decode
    tokens/s (64-token prompt, ``decode_tokens`` generated; the tokens after the first, so the prefill is
    not in it) and batch-``batch`` aggregate tokens/s (prefill included, as users see it), for swiftkv,
    its baseline mode, transformers and the installed peers (``peers``: a
    :class:`~swiftkv.bench.peers.PeerSpec`), interleaved. Also load times, memory, the weight bytes a
    decode step reads and the machine's bandwidth (batch-1 decode as a fraction of that roofline)."""
    from swiftkv.bench.peers import start_peers

    dtype = dtype_name(resolve_dtype(dtype))  # "auto" -> this machine's fastest; every system runs it
    env = environment(dtype)
    warn_if_busy(env)
    max_len = max(lengths)
    # prefix caching off: repeated runs of the same prompts must really prefill (as for the peers)
    kw = dict(max_num_batched_tokens=max(max_len, 2048), max_num_seqs=max(8, batch), enable_prefix_caching=False)
    started = time.perf_counter()
    engines = swiftkv_systems(model, dtype, **kw)
    load_s = time.perf_counter() - started
    loaded = tree_memory(os.getpid(), children=False)
    m, path = engines["swiftkv"].llm.model, engines["swiftkv"].llm.model_path
    systems = dict(engines)
    if with_transformers:
        systems["transformers"] = TransformersSystem(load_transformers_model(path, m.compute_dtype),
                                                     dtype, batch_size=batch)
    running = start_peers(peers, path, env["threads"], max_len + decode_tokens + 64, max(8, batch), dtype=dtype) if peers else {}
    failed: dict[str, str] = {}
    reset_peak_memory()  # the peak below: the runs, not the peers' one-time checkpoint preparation
    systems.update(running)
    skv = m.swiftkv_config
    rng = random.Random(0)
    result = {"env": env, "model": str(path),
              "swiftkv": {"L": skv.num_layers, "l": skv.num_key_value_layers, "G": skv.key_value_group_size},
              "versions": {name: p.version for name, p in running.items()},
              "dtypes": {name: s.dtype for name, s in systems.items()},
              "kv_bytes_per_token": {name: s.llm.engine.kv_bytes_per_token for name, s in engines.items()},
              "load_s": {"swiftkv": load_s, **{name: p.load_s for name, p in running.items()}},
              "held_bytes": held_bytes(m), "checkpoint_bytes": checkpoint_bytes(path),
              "decode_weight_bytes": {name: decode_weight_bytes(m, s.llm.swiftkv) for name, s in engines.items()},
              "prefill": {}, "decode": {}, "spread": {}, "failed": failed,
              # swiftkv's Q4/Q8 matmuls on int8 activations (opted in): their rates can pass the bf16 peak
              "int8_activations": m.compute_dtype == torch.bfloat16 and int8_dot_available()}

    def measure(key: str, prompts, n, repeats, pick=statistics.median, timer=_wall, scale: float = 1.0) -> dict:
        """Rate (``scale`` / seconds) per system under ``result[key]``, its repeats' range under
        ``result["spread"][key]``; systems that fail are dropped (named in ``result["failed"]``) and the JSON so far
        written, so a peer that crashes later loses nothing measured."""
        calls = {name: (lambda s=s: timer(s, prompts, n)) for name, s in systems.items()}
        times = interleave(calls, repeats, key, failed=failed)
        rates = {k: scale / pick(t) for k, t in times.items()}
        result["spread"][key] = {k: [scale / max(t), scale / min(t)] for k, t in times.items()}
        for name in [n for n in systems if n in failed]:
            systems.pop(name).close()
            running.pop(name, None)
        return rates

    def save() -> None:
        if out:
            atomic_write_json(out, result, indent=2)

    try:
        for n in lengths:
            prompt = random_token_prompts(rng, 1, (n, n), m.config.vocab_size)
            result["prefill"][n] = measure(f"prefill@{n}", prompt, 1, reps, scale=n)
            save()
        prompts = random_token_prompts(rng, max(1, batch), (64, 64), m.config.vocab_size)
        # the roofline's bandwidth, sampled right before and after the batch-1 runs it bounds (a child process)
        samples = [measure_bandwidth_apart(env["threads"])]
        result["decode"] = measure("decode", prompts[:1], decode_tokens, 2, min, _tpot)
        samples.append(measure_bandwidth_apart(env["threads"]))
        save()
        if batch > 1:  # 0: no aggregate figure
            result[f"decode_b{batch}"] = measure(f"decode_b{batch}", prompts, decode_tokens, 2, min,
                                                 scale=batch * decode_tokens)
            save()
        own = tree_memory(os.getpid(), children=False)  # the peers are this process's children
        result["memory"] = {"swiftkv": {"rss_after_load": loaded["rss"], "peak": own["peak"]},
                            **{name: p.memory() for name, p in running.items()}}
        result["bandwidth_samples_bytes_s"] = samples
        if not any(samples):  # no child process: here, after every run (its 1 GiB must not count in the peak above)
            samples = [measure_bandwidth()]
        result["bandwidth_bytes_s"] = bw = max(s for s in samples if s)  # the best the machine gave then
        result["matmul_peak_gflops"] = measure_matmul_peak(m.compute_dtype) / 1e9
        if m.compute_dtype == torch.bfloat16:  # the yardstick on AMX CPUs: % of 1,024 FLOP/cycle/core
            result["amx_peak_gflops"] = amx_peak_gflops(cpu_flags(), env["threads"], cpu_mhz())
    finally:
        for s in systems.values():
            s.close()
    result["decode_roofline_fraction"] = {  # tokens/s over bandwidth / bytes read per batch-1 step
        name: result["decode"][name] * result["decode_weight_bytes"][name] / bw for name in engines}
    result["prefill_gflops"] = prefill_rates(result, m.config, skv)
    result["ratios"] = _ratios(result)
    print(format_report(result))
    if out:
        atomic_write_json(out, result, indent=2)
        print(f"wrote {out}")
    return result


def prefill_rates(r: dict, config, skv) -> dict:
    """GFLOP/s each system reached at each prefill length: the FLOPs its model needs for one prompt of that length
    (``bench/flops.py``: the SwiftKV model's for swiftkv and vllm-swiftkv, the original's for the others) times its
    prompts per second. Beside ``matmul_peak_gflops`` (a square matmul in the compute dtype, same run), it says
    how far from the GEMM limit each prefill runs."""
    return {n: {name: prefill_flops(config, skv, int(n), name in SWIFTKV_SYSTEMS) * rate / int(n) / 1e9
                for name, rate in tps.items()} for n, tps in r["prefill"].items()}


def _rows(r: dict) -> list[tuple[str, dict[str, float]]]:
    """(metric label, tokens/s per system) in display order."""
    rows = [(f"prefill tok/s @ {n}", tps) for n, tps in r["prefill"].items()]
    rows.append(("decode tok/s (batch 1)", r["decode"]))  # after the first token
    rows += [(f"decode tok/s (batch {k.removeprefix('decode_b')})", v) for k, v in r.items()
             if k.startswith("decode_b") and v]
    return rows


def _ratios(r: dict) -> dict:
    """swiftkv over every other system, per metric (and baseline over transformers)."""
    ratios = {}
    for label, tps in _rows(r):
        key = label.replace(" tok/s", "").replace(" @ ", "_").replace(" (", "_").replace(")", "").replace(" ", "_")
        for other in tps:
            if other != "swiftkv" and tps.get("swiftkv"):
                ratios[f"{key}_swiftkv_over_{other}"] = tps["swiftkv"] / tps[other]
        if "transformers" in tps:
            ratios[f"{key}_baseline_over_transformers"] = tps["baseline"] / tps["transformers"]
    return ratios


def _shares(gflops: float, peak: float | None, amx: float | None) -> str:
    """`` (92%, 9% of AMX)``: a rate's share of the measured matmul peak and of the nominal AMX one, where known."""
    parts = ([f"{gflops / peak:.0%}"] if peak else []) + ([f"{gflops / amx:.0%} of AMX"] if amx else [])
    return f" ({', '.join(parts)})" if parts else ""


def format_report(r: dict) -> str:
    e, s = r["env"], r["swiftkv"]
    rows = _rows(r)
    systems = list(dict.fromkeys(k for _, tps in rows for k in tps))
    lines = [f"model {r['model']} (SwiftKV l={s['l']} of L={s['L']}, G={s['G']}), dtype {e['dtype']}, "
             f"threads {e['threads']}, torch {e['torch']}, KV cache {e.get('kv_cache_gib', '?')} GiB each, load {e['loadavg_1m']}"
             + "".join(f", {k} {v}" for k, v in r.get("versions", {}).items())
             + ("; dtypes: " + ", ".join(f"{k} {v}" for k, v in r["dtypes"].items()) if r.get("dtypes") else ""),
             f"{'metric':<28}" + "".join(f"{name:>14}" for name in systems)]
    for label, tps in rows:
        lines.append(f"{label:<28}" + "".join(f"{tps.get(k, float('nan')):>14.1f}" for k in systems))
    kv = r["kv_bytes_per_token"]
    lines.append(f"{'KV bytes/token':<28}{kv['swiftkv']:>14}{kv['baseline']:>14}")
    gb = (lambda b: f"{b / 1e9:.2f} GB")
    if "memory" in r:
        lines.append("load s: " + ", ".join(f"{k} {v:.1f}" for k, v in r["load_s"].items()) + "  (swiftkv: both modes, one model)")
        lines.append("memory (rss / peak): " + ", ".join(f"{k} {gb(v.get('rss', v.get('rss_after_load', 0)))} / "
                                                        f"{gb(v['peak'])}" for k, v in r["memory"].items()))
    if "bandwidth_bytes_s" in r:
        beside = [f"{b / 1e9:.1f}" for b in r.get("bandwidth_samples_bytes_s", []) if b]
        lines.append(f"weights held {gb(r['held_bytes'])} (checkpoint {gb(r['checkpoint_bytes'])}); memory bandwidth "
                     f"{r['bandwidth_bytes_s'] / 1e9:.1f} GB/s"
                     + (f" (the best of {' / '.join(beside)} sampled before / after them)" if beside else "")
                     + "; batch-1 decode at "
                     + ", ".join(f"{k} {v:.0%}" for k, v in r["decode_roofline_fraction"].items())
                     + " of the roofline of the weight bytes it reads")
    if "prefill_gflops" in r:
        peak, amx = r.get("matmul_peak_gflops"), r.get("amx_peak_gflops")
        for n, rates in r["prefill_gflops"].items():
            lines.append(f"prefill @ {n} GFLOP/s: " + ", ".join(f"{k} {v:.0f}{_shares(v, peak, amx)}"
                                                               for k, v in rates.items())
                + (f" -- of a {peak:.0f} GFLOP/s {e['dtype']} matmul peak measured here" if peak else "")
                + (f" and the nominal AMX-BF16 peak, {amx:,.0f} GFLOP/s at the clock /proc/cpuinfo reports" if amx else ""))
        if r.get("int8_activations"):
            lines.append("swiftkv and baseline ran their Q4/Q8 matmuls on int8 activations (SWIFTKV_INT8_DOT=1, "
                         "AVX512-VNNI): twice the bf16 products per instruction, so their rates can pass the bf16 peak")
    lines += [f"  {k}: {v:.2f}x" for k, v in r["ratios"].items()]
    lines += [f"FAILED {name}: {why}" for name, why in r.get("failed", {}).items()]
    return "\n".join(lines)
