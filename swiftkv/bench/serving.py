"""``swiftkv bench --mode serving``: ``swiftkv serve`` beside the servers users would run instead, under one
load. Every server is started (and stopped at the end) by the benchmark; at each load point -- Poisson
request rates (open loop) and concurrency levels (closed loop) -- each server gets the same requests in turn,
so a noisy machine affects all alike; each point has its own requests, so no prefix cache is warmed by an
earlier point. Reports throughput, TTFT / ITL / end-to-end percentiles and goodput under an SLO per server
and point (JSON, a text table, latency-against-load plots)."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from pathlib import Path

from swiftkv.bench.env import environment, warn_if_busy
from swiftkv.bench.online import SLO, Request, run_load
from swiftkv.bench.servers import SERVED_NAME, Server, build_servers
from swiftkv.bench.workloads import serving_requests
from swiftkv.fileio import atomic_write, atomic_write_json
from swiftkv.memory import available_bytes

POINT_METRICS = [  # (key, header, scale, format)
    ("request_throughput", "req/s", 1, "{:.3f}"), ("output_token_throughput", "out tok/s", 1, "{:.1f}"),
    ("ttft_p50", "TTFT p50", 1, "{:.2f}s"), ("ttft_p95", "TTFT p95", 1, "{:.2f}s"), ("ttft_p99", "TTFT p99", 1, "{:.2f}s"),
    ("itl_p50", "ITL p50", 1000, "{:.0f}ms"), ("itl_p95", "ITL p95", 1000, "{:.0f}ms"), ("itl_p99", "ITL p99", 1000, "{:.0f}ms"),
    ("e2e_p50", "E2E p50", 1, "{:.1f}s"), ("goodput", "goodput", 1, "{:.3f}"), ("slo_attainment", "SLO met", 100, "{:.0f}%"),
    ("errors", "errors", 1, "{:.0f}"),
]


def load_points(rates: list[float], concurrencies: list[int]) -> list[tuple[str, float]]:
    """``[("rate", r), ..., ("concurrency", c), ...]``: the open-loop points, then the closed-loop ones."""
    if not rates and not concurrencies:
        raise ValueError("give at least one --rates or --concurrencies value")
    if any(r <= 0 for r in rates) or any(c < 1 for c in concurrencies):
        raise ValueError("request rates must be > 0 and concurrencies >= 1")
    return [("rate", float(r)) for r in rates] + [("concurrency", int(c)) for c in concurrencies]


def point_name(kind: str, x: float) -> str:
    return f"rate={x:g}/s" if kind == "rate" else f"concurrency={x:g}"


def _run_point(server: Server, requests: list[Request], kind: str, x: float, seed: int, slo: SLO) -> dict:
    report = asyncio.run(run_load(server.url, SERVED_NAME, requests, rate=x if kind == "rate" else None,
                                  concurrency=int(x) if kind == "concurrency" else None, seed=seed))
    return report.summary(slo)


ISOLATIONS = ("point", "server", "none")


def sessions(servers: list[Server], num_points: int, isolation: str = "point") -> list[tuple[list[Server], list[int]]]:
    """When each server is up: ``[(servers started together, the points they run), ...]`` in run order.

    - ``point`` (default): one server up at a time, started afresh for every point; the order rotates from
      point to point. An idle server is not free on a small machine (measured on 2 cores: two idle ``vllm
      serve`` processes slowed our server's prefill by ~30%, one by ~3%), so no server is measured beside
      another, and a drifting machine still affects all alike.
    - ``server``: one server up at a time for all its points (fewer starts: models too large to restart often).
    - ``none``: all up together, interleaved point by point (fastest; the servers disturb each other)."""
    if isolation not in ISOLATIONS:
        raise ValueError(f"unknown isolation {isolation!r}; one of {', '.join(ISOLATIONS)}")
    if isolation == "none":
        return [(list(servers), list(range(num_points)))] if servers else []
    if isolation == "server":
        return [([s], list(range(num_points))) for s in servers]
    return [([s], [i]) for i in range(num_points) for s in _rotated(servers, i)]


def _rotated(items: list, i: int) -> list:
    """``items`` starting from the ``i``-th (a different one first at each point)."""
    k = i % len(items) if items else 0
    return items[k:] + items[:k]


def run_serving_bench(model: str | None, kinds: list[str], workload: str, rates: list[float],
                      concurrencies: list[int], num_requests: int, slo: SLO, out: str | Path, dtype: str = "auto",
                      seed: int = 0, vllm_python: str | None = None, llama_server: str | None = None,
                      gguf: str | None = None, isolation: str = "point") -> dict:
    """Start the servers of ``kinds`` on ``model`` (a SwiftKV checkpoint; the others get its original model or
    ``gguf``), sweep the load points, stop them; write ``OUT/serving.json``, ``serving.md`` and ``serving.png``.
    ``isolation``: which servers are up together (:func:`sessions`)."""
    import torch

    from swiftkv.builtin import resolve_model
    from swiftkv.models.registry import DEFAULT_SWIFTKV_MODEL
    from swiftkv.platforms import dtype_name, resolve_dtype

    points = load_points(rates, concurrencies)
    model_dir = resolve_model(model or DEFAULT_SWIFTKV_MODEL)
    dtype = dtype_name(resolve_dtype(dtype))
    threads = torch.get_num_threads()
    out = Path(out)
    servers, skipped = build_servers(kinds, model_dir, dtype, threads, vllm_python, llama_server, gguf)
    plan = sessions(servers, len(points), isolation)  # an unknown isolation fails here, before any start
    for kind, why in skipped.items():
        print(f"bench: {kind} skipped: {why}", file=sys.stderr)
    result = {"env": environment(dtype), "model": str(model_dir), "workload": workload, "num_requests": num_requests,
              "slo": {"ttft_s": slo.ttft_s, "itl_p95_s": slo.itl_p95_s}, "skipped": skipped,
              "isolation": isolation, "servers": {}, "points": [point_name(k, x) for k, x in points]}
    warn_if_busy(result["env"])
    if threading.current_thread() is threading.main_thread():  # a SIGTERM stops the servers too (via finally)
        signal.signal(signal.SIGTERM, _exit_once)
    try:
        for group, idx in plan:
            up = _start([s for s in group if s.name not in skipped], out, skipped)
            for s in up:
                entry = result["servers"].setdefault(s.name, {"info": s.info, "ready_s": s.ready_s, "points": {}})
                entry.setdefault("ready_s_all", []).append(s.ready_s)
            for i in idx:
                kind, x = points[i]
                requests = serving_requests(workload, num_requests, seed + i)
                for s in _rotated(up, i):
                    print(f"bench: {s.name} at {point_name(kind, x)}: {len(requests)} {workload} requests",
                          file=sys.stderr, flush=True)
                    summary = _run_point(s, requests, kind, x, seed + i, slo)
                    summary["server_memory"] = s.memory()  # resident KV cache grows as blocks are used
                    summary["available_memory"] = available_bytes()  # a run under memory pressure is not speed
                    result["servers"][s.name]["points"][point_name(kind, x)] = summary
                    atomic_write_json(out / "serving.json", result, indent=2)  # as it goes
            for s in up:
                s.stop()
    finally:
        for s in servers:
            s.stop()
    atomic_write_json(out / "serving.json", result, indent=2)
    table = format_serving(result)
    atomic_write(out / "serving.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    plot_serving(result, out / "serving.png")
    print(table)
    print(f"wrote {out / 'serving.json'}, serving.md and serving.png", file=sys.stderr)
    return result


def _exit_once(*_) -> None:
    """SIGTERM: exit through the ``finally`` that stops the servers; a second SIGTERM (``timeout`` and ``pkill``
    both send one) must not cut that cleanup short and leave a server running."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(143)


def _start(group: list[Server], out: Path, skipped: dict[str, str]) -> list[Server]:
    """Start the servers of ``group`` (all before waiting on any: they load in parallel) and one warm-up request
    each (lazy initialisation: kernel builds, graph compilation); those that fail are reported and skipped."""
    for s in group:
        print(f"bench: starting {s.name}: {' '.join(s.argv)}", file=sys.stderr, flush=True)
        s.start(out / "logs")
    up = []
    for s in group:
        try:
            s.wait_ready()
            warm = asyncio.run(run_load(s.url, SERVED_NAME, [Request("Hello, how are you today?", 4)], concurrency=1))
            if not warm.traces[0].ok:
                raise RuntimeError(f"warm-up request failed: {warm.traces[0].error}")
        except RuntimeError as e:
            print(f"bench: {s.name} failed: {e}", file=sys.stderr)
            skipped[s.name] = str(e).splitlines()[0]
            s.stop()
            continue
        up.append(s)
    return up


def _fmt(value, scale, fmt) -> str:
    return "-" if value is None else fmt.format(value * scale)


def format_serving(result: dict) -> str:
    """One markdown table per load point: a row per server."""
    lines = [(f"workload {result['workload']} ({result['num_requests']} requests per point), dtype "
              f"{result['env']['dtype']}, {result['env']['threads']} threads, SLO: TTFT <= {result['slo']['ttft_s']} s "
              f"and ITL p95 <= {1000 * result['slo']['itl_p95_s']:.0f} ms")]
    for name, s in result["servers"].items():
        lines.append(f"- {name}: {s['info']['version']}, {s['info']['dtype']}, ready in {s['ready_s']:.0f} s: "
                     f"`{s['info']['flags']}`")
    for kind, why in result.get("skipped", {}).items():
        lines.append(f"- {kind}: not run ({why})")
    for point in result["points"]:
        lines += ["", f"**{point}**", "", "| server | " + " | ".join(h for _, h, _, _ in POINT_METRICS) + " |",
                  "|---" * (len(POINT_METRICS) + 1) + "|"]
        for name, s in result["servers"].items():
            m = s["points"].get(point)
            if m is not None:
                lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k), sc, f) for k, _, sc, f in POINT_METRICS) + " |")
    return "\n".join(lines)


def plot_serving(result: dict, path: Path) -> None:
    """Latency and throughput against offered load, a line per server; a row per load kind (rate, concurrency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("rate", "concurrency") if any(p.startswith(k) for p in result["points"])]
    panels = [("ttft", "TTFT p50 / p95 (s)"), ("itl_p95", "ITL p95 (ms)"), ("output_token_throughput",
              "output tokens/s"), ("goodput", "goodput (good requests/s)")]
    fig, axes = plt.subplots(len(kinds), len(panels), figsize=(4.2 * len(panels), 3.4 * len(kinds)), squeeze=False)
    for row, kind in zip(axes, kinds):
        pts = [p for p in result["points"] if p.startswith(kind)]
        xs = [float(p.split("=")[1].removesuffix("/s")) for p in pts]
        for ci, (name, s) in enumerate(result["servers"].items()):
            color = f"C{ci}"
            ms = [s["points"].get(p, {}) for p in pts]
            for ax, (key, label) in zip(row, panels):
                if key == "ttft":
                    ax.plot(xs, [m.get("ttft_p50") for m in ms], "o-", color=color, label=name)
                    ax.plot(xs, [m.get("ttft_p95") for m in ms], "o--", color=color, alpha=0.6)
                    ax.set_yscale("log")  # a server far behind must not flatten the others
                else:
                    scale = 1000 if key == "itl_p95" else 1
                    ax.plot(xs, [None if m.get(key) is None else m[key] * scale for m in ms], "o-", color=color,
                            label=name)
                ax.set_title(label, fontsize=10)
                ax.set_xlabel("request rate (req/s, Poisson)" if kind == "rate" else "concurrency (closed loop)")
        row[0].legend(fontsize=8)
    fig.suptitle(f"{Path(result['model']).name}: {result['workload']}, {result['env']['dtype']}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
