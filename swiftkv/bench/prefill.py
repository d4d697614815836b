"""``swiftkv bench --workload prefill``: prefill and decode throughput of swiftkv (SwiftKV mode),
swiftkv (baseline mode, same engine with l = L), transformers (eager) and, when installed, vLLM and
llama.cpp, interleaved so a noisy machine affects all alike. Reports tokens/s and ratios; writes JSON.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path


from swiftkv.bench.env import environment, warn_if_busy
from swiftkv.bench.interleave import interleave
from swiftkv.bench.systems import TransformersSystem, load_transformers_model, swiftkv_systems
from swiftkv.bench.workloads import random_token_prompts
from swiftkv.platforms import dtype_name, resolve_dtype


def _wall(system, prompts: list[list[int]], n: int) -> float:
    return system.run(prompts, n)["wall_s"]


def run_prefill_bench(model: str | None = None, lengths: tuple[int, ...] = (512, 2048), reps: int = 3,
                      decode_tokens: int = 64, dtype: str = "auto", out: str | None = None,
                      with_transformers: bool = True, peers=None, batch: int = 32) -> dict:
    """Prefill tokens/s at each of ``lengths`` (one prompt, first token only), batch-1 decode
    tokens/s and batch-``batch`` aggregate decode tokens/s (64-token prompts, ``decode_tokens``
    generated, prefill included as users see it), for swiftkv, its baseline mode, transformers
    and the installed peers (``peers``: a :class:`~swiftkv.bench.peers.PeerSpec`), interleaved."""
    from swiftkv.bench.peers import start_peers

    dtype = dtype_name(resolve_dtype(dtype))  # "auto" -> this machine's fastest; every system runs it
    env = environment(dtype)
    warn_if_busy(env)
    max_len = max(lengths)
    # prefix caching off: repeated runs of the same prompts must really prefill (as for the peers)
    kw = dict(max_num_batched_tokens=max(max_len, 2048), max_num_seqs=max(8, batch), enable_prefix_caching=False)
    engines = swiftkv_systems(model, dtype, **kw)
    m, path = engines["swiftkv"].llm.model, engines["swiftkv"].llm.model_path
    systems = dict(engines)
    if with_transformers:
        systems["transformers"] = TransformersSystem(load_transformers_model(path, m.compute_dtype),
                                                     dtype, batch_size=batch)
    running = start_peers(peers, path, env["threads"], max_len + decode_tokens + 64, max(8, batch), dtype=dtype) if peers else {}
    systems.update(running)
    skv = m.swiftkv_config
    rng = random.Random(0)
    result = {"env": env, "model": str(path),
              "swiftkv": {"L": skv.num_layers, "l": skv.num_key_value_layers, "G": skv.key_value_group_size},
              "versions": {name: p.version for name, p in running.items()},
              "dtypes": {name: s.dtype for name, s in systems.items()},
              "kv_bytes_per_token": {name: s.llm.engine.kv_bytes_per_token for name, s in engines.items()},
              "prefill": {}, "decode": {}, f"decode_b{batch}": {}}

    def measure(prompts, n, repeats, desc, pick=statistics.median) -> dict[str, float]:
        calls = {name: (lambda s=s: _wall(s, prompts, n)) for name, s in systems.items()}
        return {name: pick(t) for name, t in interleave(calls, repeats, desc).items()}

    try:
        for n in lengths:
            prompt = random_token_prompts(rng, 1, (n, n), m.config.vocab_size)
            result["prefill"][n] = {k: n / t for k, t in measure(prompt, 1, reps, f"prefill @ {n}").items()}
        prompts = random_token_prompts(rng, batch, (64, 64), m.config.vocab_size)
        result["decode"] = {k: decode_tokens / t
                            for k, t in measure(prompts[:1], decode_tokens, 2, "decode b1", min).items()}
        result[f"decode_b{batch}"] = {k: batch * decode_tokens / t
                                      for k, t in measure(prompts, decode_tokens, 2, f"decode b{batch}", min).items()}
    finally:
        for s in systems.values():
            s.close()
    result["ratios"] = _ratios(result)
    print(format_report(result))
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    return result


def _rows(r: dict) -> list[tuple[str, dict[str, float]]]:
    """(metric label, tokens/s per system) in display order."""
    rows = [(f"prefill tok/s @ {n}", tps) for n, tps in r["prefill"].items()]
    rows.append(("decode tok/s (batch 1)", r["decode"]))
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
    lines += [f"  {k}: {v:.2f}x" for k, v in r["ratios"].items()]
    return "\n".join(lines)
