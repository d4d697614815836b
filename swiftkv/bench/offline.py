"""``swiftkv bench MODEL --workload ...``: one offline workload on several systems, interleaved
(A B C A B C ...), with throughput, prefill rate, TTFT/TPOT, KV bytes, FLOP/s and MFU."""

from __future__ import annotations

import random
import resource
import statistics
import time
from dataclasses import dataclass

import torch

from swiftkv.bench.flops import decode_flops, prefill_flops
from swiftkv.sampling_params import SamplingParams

WORKLOADS = {  # (num requests, prompt tokens range, output tokens)
    "prompt-heavy": (16, (1024, 2048), 32),
    "chat": (16, (64, 256), 128),
    "shared-prefix": (32, (200, 200), 32),  # + one 1,500-token prefix shared by all (RAG / classification)
}
SHARED_PREFIX_TOKENS = 1500


def uses_prefix_caching(workload: str) -> bool:
    """Systems run with prefix caching on the shared-prefix workload only; elsewhere it is off so that
    repeated runs of the same prompts really prefill. Either way the cache is emptied before every run."""
    return workload == "shared-prefix"


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    max_tokens: int

    @classmethod
    def make(cls, name: str, vocab: int, seed: int = 0, num_requests: int | None = None,
             prompt_len: tuple[int, int] | None = None, max_tokens: int | None = None) -> Workload:
        if name not in WORKLOADS and name != "custom":
            raise ValueError(f"unknown workload {name!r}; choose {', '.join(WORKLOADS)} or custom")
        n, lens, out = WORKLOADS.get(name, (16, (512, 512), 32))
        n, lens, out = num_requests or n, prompt_len or lens, max_tokens or out
        rng = random.Random(seed)
        prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(*lens))] for _ in range(n)]
        if name == "shared-prefix":  # one system prompt, then each request's own tail
            shared = [rng.randrange(100, vocab) for _ in range(SHARED_PREFIX_TOKENS)]
            prompts = [shared + p for p in prompts]
        return cls(name, prompts, out)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return len(self.prompts) * self.max_tokens


def workload_flops(config, skv, w: Workload, swiftkv: bool) -> float:
    total = sum(prefill_flops(config, skv, len(p), swiftkv) for p in w.prompts)
    for p in w.prompts:  # decode tokens after the first (sampled from the prefill logits)
        total += sum(decode_flops(config, len(p) + i) for i in range(1, w.max_tokens))
    return total


def run_engine(llm, w: Workload) -> dict:
    """All requests at once through the engine; per-request TTFT and TPOT from step timestamps."""
    params = SamplingParams(temperature=0, max_tokens=w.max_tokens, ignore_eos=True)
    eng = llm.engine
    eng.reset_prefix_cache()  # each run starts cold, as the peers' do
    t0 = time.perf_counter()
    ids = [eng.add_request(p, params) for p in w.prompts]
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
    ttft = [first[i] - t0 for i in ids]
    tpot = [(done[i] - first[i]) / max(1, w.max_tokens - 1) for i in ids]
    return {"wall_s": wall, "ttft": ttft, "tpot": tpot}


def run_transformers(hf, w: Workload, batch_size: int) -> dict:
    """``generate()`` in left-padded batches; TTFT from a 1-token generate of the same batch."""
    ttft, tpot, wall = [], [], 0.0
    pad = hf.generation_config.pad_token_id or hf.config.eos_token_id or 0
    pad = pad[0] if isinstance(pad, list) else pad
    for s in range(0, len(w.prompts), batch_size):
        batch = w.prompts[s : s + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        kw = dict(attention_mask=mask, do_sample=False, pad_token_id=pad)
        with torch.inference_mode():
            t = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            first = time.perf_counter() - t
            t = time.perf_counter()
            hf.generate(ids, max_new_tokens=w.max_tokens, min_new_tokens=w.max_tokens, **kw)
            total = time.perf_counter() - t
        wall += total
        ttft += [wall - total + first] * len(batch)
        tpot += [(total - first) / max(1, w.max_tokens - 1)] * len(batch)
    return {"wall_s": wall, "ttft": ttft, "tpot": tpot}


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
                      kv_budget_gb: float = 1.0, seed: int = 0, peers=None) -> dict:
    """Run ``workload`` on swiftkv (SwiftKV), swiftkv (baseline), transformers and the installed
    peers (``peers``: a :class:`~swiftkv.bench.peers.PeerSpec`), interleaved."""
    from pathlib import Path

    from swiftkv.bench.env import environment, warn_if_busy
    from swiftkv.bench.flops import measure_matmul_peak
    from swiftkv.bench.interleave import interleave
    from swiftkv.bench.peers import start_peers, system_dtypes
    from swiftkv.bench.prefill import _hf_model
    from swiftkv.bench.report import format_table, plot, ratio_lines, write_json
    from swiftkv.engine.model_runner import kv_bytes_per_token
    from swiftkv.llm import LLM
    from swiftkv.platforms import dtype_name, resolve_dtype

    dtype = dtype_name(resolve_dtype(dtype))  # "auto" -> this machine's fastest; every system runs it
    env = environment(dtype)
    warn_if_busy(env)
    caching = uses_prefix_caching(workload.name if isinstance(workload, Workload) else workload)
    kw = dict(dtype=dtype, max_num_seqs=max_num_seqs, max_num_batched_tokens=2048, enable_prefix_caching=caching)
    engines = {"swiftkv": LLM(model, swiftkv=True, **kw)}
    engines["baseline"] = LLM(engines["swiftkv"].model_path, swiftkv=False, **kw)
    m = engines["swiftkv"].model
    cfg, skv = m.config, m.swiftkv_config
    w = workload if isinstance(workload, Workload) else Workload.make(workload, cfg.vocab_size, seed)
    hf = _hf_model(engines["swiftkv"].model_path, m.model.embed_tokens.weight.dtype) if with_transformers else None
    runners = {name: (lambda llm=llm: run_engine(llm, w)) for name, llm in engines.items()}
    if hf is not None:
        runners["transformers"] = lambda: run_transformers(hf, w, max_num_seqs)
    max_len = max(len(p) for p in w.prompts) + w.max_tokens + 16
    running = start_peers(peers, engines["swiftkv"].model_path, env["threads"], max_len, max_num_seqs, out_dir, dtype,
                          caching) if peers else {}
    runners.update({name: (lambda p=p: p.run(w.prompts, w.max_tokens)) for name, p in running.items()})
    warm = Workload(w.name, w.prompts[:1], 2)
    try:
        for llm in engines.values():  # warm-up: first-call allocations and thread pools
            run_engine(llm, warm)
        if hf is not None:
            run_transformers(hf, warm, 1)
        for p in running.values():
            p.run(warm.prompts, warm.max_tokens)
        peak = measure_matmul_peak(m.model.embed_tokens.weight.dtype)
        raw = interleave(runners, reps, w.name, warmup=False)  # warmed up above, on a small run
    finally:
        for p in running.values():
            p.close()
    seq_len = w.prompt_tokens / len(w.prompts) + w.max_tokens
    budget = kv_budget_gb * (1 << 30)
    systems = {}
    for name, runs in raw.items():
        swift = name in ("swiftkv", "vllm-swiftkv")  # the systems that run the SwiftKV model
        kvb = kv_bytes_per_token(cfg, skv if swift else type(skv).baseline(skv.num_layers), m.model.embed_tokens.weight.dtype)
        systems[name] = {**summarise(runs, w, workload_flops(cfg, skv, w, swift), peak),
                         "kv_bytes_per_token": kvb, "max_concurrent_seqs": int(budget // (kvb * seq_len))}
    result = {"env": env, "model": str(engines["swiftkv"].model_path), "workload": w.name,
              "requests": len(w.prompts), "prompt_tokens": w.prompt_tokens, "output_tokens": w.output_tokens,
              "swiftkv": {"L": skv.num_layers, "l": skv.num_key_value_layers, "G": skv.key_value_group_size},
              "versions": {name: p.version for name, p in running.items()},
              "dtypes": system_dtypes(runners, running, dtype),
              "matmul_peak_gflops": peak / 1e9, "peak_rss_mb": peak_rss_mb(), "kv_budget_gb": kv_budget_gb,
              "systems": systems}
    title = (f"{w.name}: {len(w.prompts)} requests, {w.prompt_tokens} prompt / {w.output_tokens} output tokens, "
             f"SwiftKV l={skv.num_key_value_layers}/{skv.num_layers} G={skv.key_value_group_size}; "
             f"{env['dtype']}, {env['threads']} threads, load {env['loadavg_1m']}")
    print(title)
    print("dtypes: " + ", ".join(f"{k} {v}" for k, v in result["dtypes"].items()))
    print(format_table(systems))
    print("\n".join(ratio_lines(systems)))
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(result, out / f"bench_{w.name}.json")
        plot(systems, title, out / f"bench_{w.name}.png")
        print(f"wrote {out}/bench_{w.name}.json and .png")
    return result
