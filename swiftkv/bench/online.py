"""Online load against an OpenAI-compatible server: streaming requests at a fixed concurrency or
Poisson arrival rate; client-side TTFT / TPOT percentiles, throughput and error counts."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestResult:
    ok: bool
    status: int = 0
    ttft: float | None = None
    tpot: float | None = None  # mean seconds per output token after the first
    output_tokens: int = 0
    prompt_tokens: int = 0
    latency: float = 0.0
    error: str = ""


@dataclass
class LoadReport:
    results: list[RequestResult] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict:
        ok = [r for r in self.results if r.ok]

        def pct(xs: list[float], q: float) -> float | None:
            if not xs:
                return None
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]

        ttft = [r.ttft for r in ok if r.ttft is not None]
        tpot = [r.tpot for r in ok if r.tpot is not None]
        out_tokens = sum(r.output_tokens for r in ok)
        return {
            "requests": len(self.results), "ok": len(ok), "errors": len(self.results) - len(ok),
            "error_statuses": sorted({r.status for r in self.results if not r.ok}),
            "wall_s": round(self.wall_s, 2),
            "requests_per_s": round(len(ok) / self.wall_s, 3) if self.wall_s else None,
            "output_tokens_per_s": round(out_tokens / self.wall_s, 1) if self.wall_s else None,
            "total_tokens_per_s": round((out_tokens + sum(r.prompt_tokens for r in ok)) / self.wall_s, 1) if self.wall_s else None,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99),
            "mean_latency_s": statistics.fmean(r.latency for r in ok) if ok else None,
        }


async def _one(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> RequestResult:
    t0 = time.perf_counter()
    first = last = None
    n = 0
    usage = {}
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                return RequestResult(False, r.status_code, error=(await r.aread()).decode(errors="replace")[:200])
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(False, 200, error=chunk["error"]["message"])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("choices"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    n += 1
    except httpx.HTTPError as e:
        return RequestResult(False, 0, error=repr(e))
    end = time.perf_counter()
    tokens = usage.get("completion_tokens", n)
    tpot = (last - first) / (tokens - 1) if first and last and tokens > 1 else None
    return RequestResult(True, 200, None if first is None else first - t0, tpot, tokens,
                         usage.get("prompt_tokens", 0), end - t0)


async def run_load(base_url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int = 8,
                   rate: float | None = None, api_key: str | None = None, seed: int = 0,
                   chat: bool = False) -> LoadReport:
    """Send every prompt once. ``rate`` (req/s, Poisson) or else a closed loop of ``concurrency``."""
    url = base_url.rstrip("/") + ("/v1/chat/completions" if chat else "/v1/completions")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = random.Random(seed)
    report = LoadReport()
    sem = asyncio.Semaphore(concurrency if rate is None else 10_000)

    def body(p: str) -> dict:
        b = {"model": model, "max_tokens": max_tokens, "stream": True, "temperature": 0, "ignore_eos": True,
             "stream_options": {"include_usage": True}}
        return {**b, "messages": [{"role": "user", "content": p}]} if chat else {**b, "prompt": p}

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=1000)) as client:
        async def task(p: str) -> None:
            async with sem:
                report.results.append(await _one(client, url, body(p), headers))

        t0 = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(task(p)))
            if rate is not None:
                await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        report.wall_s = time.perf_counter() - t0
    return report
