"""The load generator for OpenAI-compatible servers (ours, ``vllm serve``, ``llama-server``): streamed requests
sent open-loop (Poisson arrivals at a rate) or closed-loop (a fixed number in flight); every request's timeline
kept on the client's clock (sent, each streamed token, done), and from the timelines what vLLM's serving
benchmark reports: throughput, TTFT, inter-token latency (ITL) and end-to-end p50 / p95 / p99, and goodput
under an SLO."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import httpx


def import_httpx():
    """httpx, the HTTP client of the online and serving modes: not a core dependency (the ``bench`` extra)."""
    try:
        import httpx
    except ImportError:
        raise ValueError("swiftkv bench --mode online/serving needs httpx: pip install 'swiftkv[bench]' "
                         "(or pip install httpx)") from None
    return httpx


@dataclass
class RequestTrace:
    """One request as the client saw it: the times it was sent, each streamed token arrived, and it ended."""

    sent: float
    token_times: list[float] = field(default_factory=list)
    end: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0  # the server's usage count, else the streamed chunks with text
    ok: bool = True
    status: int = 200
    error: str = ""

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def itls(self) -> list[float]:
        """Seconds between consecutive streamed tokens."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def e2e(self) -> float:
        return self.end - self.sent


@dataclass(frozen=True)
class SLO:
    """What a request must meet to count as good: its TTFT, and the 95th percentile of its ITLs."""

    ttft_s: float = 5.0
    itl_p95_s: float = 0.2

    def met(self, t: RequestTrace) -> bool:
        return (t.ok and t.ttft is not None and t.ttft <= self.ttft_s
                and (not t.itls or float(np.percentile(t.itls, 95)) <= self.itl_p95_s))


def _stats(xs: list[float], prefix: str) -> dict[str, float | None]:
    """``{prefix_mean, prefix_p50, prefix_p95, prefix_p99}`` (numpy's linear percentiles, as vLLM's benchmark)."""
    if not xs:
        return {f"{prefix}_{k}": None for k in ("mean", "p50", "p95", "p99")}
    a = np.asarray(xs, dtype=float)
    return {f"{prefix}_mean": float(a.mean()), **{f"{prefix}_p{q}": float(np.percentile(a, q)) for q in (50, 95, 99)}}


@dataclass
class LoadReport:
    traces: list[RequestTrace] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self, slo: SLO | None = None) -> dict:
        """Throughput, goodput and latency percentiles of the run (seconds; ITL pooled over all requests)."""
        slo = slo or SLO()
        ok = [t for t in self.traces if t.ok]
        wall = self.wall_s or float("nan")
        out_tokens = sum(t.output_tokens for t in ok)
        good = sum(slo.met(t) for t in self.traces)
        return {
            "requests": len(self.traces), "ok": len(ok), "errors": len(self.traces) - len(ok),
            "error_statuses": sorted({t.status for t in self.traces if not t.ok}),
            "error_messages": sorted({t.error for t in self.traces if not t.ok})[:3],
            "wall_s": round(self.wall_s, 3),
            "request_throughput": len(ok) / wall, "output_token_throughput": out_tokens / wall,
            "total_token_throughput": (out_tokens + sum(t.prompt_tokens for t in ok)) / wall,
            "goodput": good / wall, "slo_attainment": good / len(self.traces) if self.traces else None,
            "slo": {"ttft_s": slo.ttft_s, "itl_p95_s": slo.itl_p95_s},
            **_stats([t.ttft for t in ok if t.ttft is not None], "ttft"),
            **_stats([x for t in ok for x in t.itls], "itl"),
            **_stats([t.e2e for t in ok], "e2e"),
        }


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of ``n`` requests arriving as a Poisson process of ``rate`` per second."""
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def _is_token(chunk: dict) -> bool:
    """Whether a streamed chunk carries a generated token: text (completions) or content (chat), also an
    empty one mid-stream (a special or partial-character token); not a chat role announcement, and not an
    empty closing chunk that only carries the finish reason (llama-server sends one)."""
    choices = chunk.get("choices") or []
    if not choices:
        return False
    choice = choices[0]
    if "delta" in choice:
        delta = choice["delta"] or {}
        text, announce = delta.get("content"), "role" in delta
        return bool(text) or (text == "" and not announce and choice.get("finish_reason") is None)
    text = choice.get("text")
    return text is not None and (text != "" or choice.get("finish_reason") is None)


async def _one(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> RequestTrace:
    httpx = import_httpx()
    trace = RequestTrace(sent=time.perf_counter())
    usage: dict = {}
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                trace.ok, trace.status = False, r.status_code
                trace.error = (await r.aread()).decode(errors="replace")[:300]
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data:") or line[5:].strip() in ("", "[DONE]"):
                        continue
                    chunk = json.loads(line[5:])
                    if "error" in chunk:
                        trace.ok, trace.error = False, str(chunk["error"])[:300]
                        break
                    usage = chunk.get("usage") or usage
                    closing = bool(chunk.get("choices")) and chunk["choices"][0].get("finish_reason") is not None
                    if _is_token(chunk) or (closing and not trace.token_times):  # one empty token, then the end
                        trace.token_times.append(time.perf_counter())
    except httpx.HTTPError as e:
        trace.ok, trace.status, trace.error = False, 0, repr(e)[:300]
    trace.end = time.perf_counter()
    trace.prompt_tokens = usage.get("prompt_tokens", 0)
    trace.output_tokens = usage.get("completion_tokens", len(trace.token_times))
    if trace.ok and not trace.token_times:
        trace.ok, trace.error = False, "no token streamed"
    return trace


@dataclass
class Request:
    """One request of a workload: a prompt (text, or chat messages) and its output length."""

    prompt: str | list[dict]
    max_tokens: int

    def body(self, model: str) -> dict:
        b = {"model": model, "max_tokens": self.max_tokens, "stream": True, "temperature": 0, "ignore_eos": True,
             "stream_options": {"include_usage": True}}
        return {**b, "messages": self.prompt} if isinstance(self.prompt, list) else {**b, "prompt": self.prompt}


async def run_load(base_url: str, model: str, requests: list[Request], concurrency: int | None = None,
                   rate: float | None = None, api_key: str | None = None, seed: int = 0,
                   timeout: float = 1800.0) -> LoadReport:
    """Send every request once: at Poisson arrival times of ``rate`` per second (open loop: nothing waits for
    the server), or with ``concurrency`` in flight (closed loop). Chat requests go to ``/v1/chat/completions``."""
    if (rate is None) == (concurrency is None):
        raise ValueError("give a request rate (open loop) or a concurrency (closed loop), one of them")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    httpx = import_httpx()
    root = base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    report = LoadReport()
    arrivals = poisson_arrivals(len(requests), rate, seed) if rate is not None else None
    sem = asyncio.Semaphore(concurrency or len(requests) or 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=httpx.Limits(max_connections=1000)) as client:
        t0 = time.perf_counter()

        async def task(i: int, req: Request) -> None:
            if arrivals is not None:
                await asyncio.sleep(max(0.0, t0 + arrivals[i] - time.perf_counter()))
            async with sem:
                route = "/v1/chat/completions" if isinstance(req.prompt, list) else "/v1/completions"
                report.traces.append(await _one(client, root + route, req.body(model), headers))

        await asyncio.gather(*(task(i, r) for i, r in enumerate(requests)))
        report.wall_s = time.perf_counter() - t0
    return report
