"""The serving benchmark's load generator: metrics from request timelines whose times are known (a stub
timeline, and a stub server that streams on a known schedule), open- and closed-loop sending, our real
server driven end to end, the report and plot, and which servers can start here."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from conftest import LoopbackServer

from swiftkv.bench.online import SLO, LoadReport, Request, RequestTrace, poisson_arrivals, run_load


def _trace(sent, tokens, end, out=None, ok=True):
    return RequestTrace(sent=sent, token_times=list(tokens), end=end, prompt_tokens=100,
                        output_tokens=len(tokens) if out is None else out, ok=ok, status=200 if ok else 500)


def test_metrics_from_a_known_timeline():
    traces = [
        _trace(0.0, [1.0, 1.1, 1.2, 1.3], 1.3),  # TTFT 1, ITLs 0.1 x 3
        _trace(0.5, [2.5, 2.6, 3.1], 3.2),  # TTFT 2, ITLs 0.1 and 0.5
        _trace(1.0, [7.0, 7.05], 7.1),  # TTFT 6 (misses the 5 s SLO)
        _trace(2.0, [], 2.5, ok=False),  # an error: in no latency, counted in errors
    ]
    assert traces[1].ttft == 2.0 and traces[1].itls == pytest.approx([0.1, 0.5]) and traces[2].e2e == pytest.approx(6.1)
    s = LoadReport(traces, wall_s=8.0).summary(SLO(ttft_s=5.0, itl_p95_s=0.2))
    assert (s["requests"], s["ok"], s["errors"], s["error_statuses"]) == (4, 3, 1, [500])
    assert s["ttft_p50"] == pytest.approx(2.0) and s["ttft_p95"] == pytest.approx(np.percentile([1, 2, 6], 95))
    assert s["ttft_mean"] == pytest.approx(3.0)
    itls = [0.1, 0.1, 0.1, 0.1, 0.5, 0.05]  # pooled over the requests
    assert s["itl_p50"] == pytest.approx(0.1) and s["itl_p99"] == pytest.approx(np.percentile(itls, 99))
    assert s["e2e_p50"] == pytest.approx(2.7)
    assert s["request_throughput"] == pytest.approx(3 / 8) and s["output_token_throughput"] == pytest.approx(9 / 8)
    assert s["total_token_throughput"] == pytest.approx((9 + 300) / 8)
    # good: request 0 only (1: ITL p95 of [0.1, 0.5] = 0.48 > 0.2; 2: TTFT 6 > 5; 3: failed)
    assert s["goodput"] == pytest.approx(1 / 8) and s["slo_attainment"] == 0.25
    assert LoadReport(traces, 8.0).summary(SLO(ttft_s=10, itl_p95_s=1))["slo_attainment"] == 0.75


def test_poisson_arrivals_are_seeded_and_have_the_rate():
    a = poisson_arrivals(4000, rate=2.0, seed=3)
    assert a == poisson_arrivals(4000, rate=2.0, seed=3) and a != poisson_arrivals(4000, rate=2.0, seed=4)
    assert a[0] == 0 and all(y >= x for x, y in zip(a, a[1:]))
    assert np.mean(np.diff(a)) == pytest.approx(0.5, rel=0.05)  # 1 / rate
    with pytest.raises(ValueError, match="rate must be > 0"):
        poisson_arrivals(3, 0)


class _StubServer:
    """An OpenAI-style streaming server with a known schedule: the first token ``first_s`` after the request,
    then one every ``every_s``; it counts the requests in flight."""

    def __init__(self, first_s: float, every_s: float) -> None:
        from fastapi import FastAPI
        from fastapi.responses import StreamingResponse

        self.in_flight = self.max_in_flight = 0
        self.received: list[float] = []
        app = FastAPI()

        @app.post("/v1/completions")
        async def completions(body: dict):
            self.received.append(time.perf_counter())

            async def events():
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    await asyncio.sleep(first_s)
                    for i in range(body["max_tokens"]):
                        if i:
                            await asyncio.sleep(every_s)
                        yield "data: " + json.dumps({"choices": [{"index": 0, "text": f" t{i}"}]}) + "\n\n"
                    usage = {"prompt_tokens": 7, "completion_tokens": body["max_tokens"]}
                    yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    self.in_flight -= 1

            return StreamingResponse(events(), media_type="text/event-stream")

        self.server = LoopbackServer(app)


@pytest.fixture(scope="module")
def stub():
    s = _StubServer(first_s=0.3, every_s=0.05)
    yield s
    s.server.stop()


def test_closed_loop_keeps_the_concurrency_and_measures_the_schedule(stub):
    stub.max_in_flight = 0
    reqs = [Request("hello", 4) for _ in range(6)]
    report = asyncio.run(run_load(stub.server.url, "m", reqs, concurrency=2))
    assert stub.max_in_flight == 2
    assert len(report.traces) == 6 and all(t.ok for t in report.traces)
    for t in report.traces:  # never faster than the server's schedule (lower bounds only: no timing threshold)
        assert t.ttft >= 0.3 and len(t.itls) == 3 and min(t.itls) >= 0.045
        assert (t.prompt_tokens, t.output_tokens) == (7, 4)
    assert report.wall_s >= 3 * (0.3 + 3 * 0.05)  # three waves of two


def test_open_loop_sends_at_the_arrival_times_without_waiting(stub):
    stub.received.clear()
    stub.max_in_flight = 0
    reqs = [Request("hello", 3) for _ in range(5)]
    start = time.perf_counter()
    report = asyncio.run(run_load(stub.server.url, "m", reqs, rate=20.0, seed=1))
    sent = sorted(t.sent - start for t in report.traces)
    arrivals = poisson_arrivals(5, 20.0, seed=1)
    assert all(s >= a for s, a in zip(sent, arrivals))  # never early
    assert stub.max_in_flight >= 2  # arrivals ~50 ms apart, each request ~0.4 s: they overlap (open loop)
    with pytest.raises(ValueError, match="one of them"):
        asyncio.run(run_load(stub.server.url, "m", reqs, rate=1.0, concurrency=2))


def test_our_server_end_to_end(server):
    from swiftkv.bench.workloads import serving_requests

    reqs = serving_requests("chat", 3, seed=0)[:2] + [Request("Once upon a time", 5)]
    for r in reqs:
        r.max_tokens = 5
    report = asyncio.run(run_load(server[0].url, "tiny", reqs, concurrency=2))
    assert all(t.ok for t in report.traces), [t.error for t in report.traces]
    assert all(t.output_tokens == 5 and t.prompt_tokens > 0 and t.ttft <= t.e2e for t in report.traces)
    s = report.summary()
    assert s["ok"] == 3 and s["ttft_p50"] > 0 and s["itl_p50"] > 0


def test_serving_requests_are_seeded_and_shaped():
    from swiftkv.bench.workloads import serving_requests

    a = serving_requests("prompt-heavy", 4, seed=2)
    assert [r.prompt for r in a] == [r.prompt for r in serving_requests("prompt-heavy", 4, seed=2)]
    assert [r.prompt for r in a] != [r.prompt for r in serving_requests("prompt-heavy", 4, seed=3)]
    assert all(900 <= len(r.prompt.split()) <= 2000 and 32 <= r.max_tokens <= 128 for r in a)
    shared = serving_requests("shared-prefix", 3, seed=0)
    head = shared[0].prompt[:5000]
    assert all(r.prompt.startswith(head) for r in shared) and len({r.prompt for r in shared}) == 3
    assert isinstance(serving_requests("chat", 1)[0].prompt, list)
    with pytest.raises(ValueError, match="unknown serving workload"):
        serving_requests("prefill", 1)


def test_report_table_and_plot(tmp_path):
    from swiftkv.bench.serving import format_serving, load_points, plot_serving

    summary = LoadReport([_trace(0.0, [1.0, 1.1], 1.2)], 2.0).summary()
    server = {"info": {"version": "x 1", "dtype": "float32", "flags": "--a"}, "ready_s": 3.0,
              "points": {"rate=0.5/s": summary, "concurrency=2": summary}}
    result = {"env": {"dtype": "float32", "threads": 2}, "model": "/m/skv", "workload": "prompt-heavy",
              "num_requests": 1, "slo": {"ttft_s": 5.0, "itl_p95_s": 0.2}, "skipped": {"llama-server": "not found"},
              "servers": {"swiftkv": server, "vllm": server}, "points": ["rate=0.5/s", "concurrency=2"]}
    table = format_serving(result)
    assert "**rate=0.5/s**" in table and "| swiftkv | 0.500 |" in table and "llama-server: not run (not found)" in table
    plot_serving(result, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 10_000
    assert load_points([0.5], [2, 4]) == [("rate", 0.5), ("concurrency", 2), ("concurrency", 4)]
    with pytest.raises(ValueError, match="at least one"):
        load_points([], [])


def test_build_servers_says_what_cannot_run(tmp_path, monkeypatch):
    from swiftkv.bench.servers import build_servers

    monkeypatch.delenv("SWIFTKV_LLAMA_SERVER", raising=False)
    servers, skipped = build_servers(["swiftkv", "swiftkv-baseline", "llama-server"], tmp_path, "float32", 2)
    assert [s.name for s in servers] == ["swiftkv", "swiftkv-baseline"] and "--no-swiftkv" in servers[1].argv
    assert "llama-server not found" in skipped["llama-server"]
    with pytest.raises(ValueError, match="unknown server"):
        build_servers(["tgi"], tmp_path, "float32", 2)


@pytest.mark.parametrize("chunk,is_token", [
    ({"choices": [{"text": " the", "finish_reason": None}]}, True),
    ({"choices": [{"text": "", "finish_reason": None}]}, True),  # a special / partial-character token
    ({"choices": [{"text": "", "finish_reason": "stop"}]}, False),  # llama-server's closing chunk
    ({"choices": [{"text": " end", "finish_reason": "length"}]}, True),
    ({"choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}, False),  # announcement
    ({"choices": [{"delta": {"content": "Hi"}, "finish_reason": None}]}, True),
    ({"choices": [{"delta": {"content": ""}, "finish_reason": None}]}, True),
    ({"choices": [{"delta": {}, "finish_reason": "stop"}]}, False),
    ({"choices": [], "usage": {"completion_tokens": 3}}, False),
])
def test_which_streamed_chunks_are_tokens(chunk, is_token):
    from swiftkv.bench.online import _is_token

    assert _is_token(chunk) == is_token


def test_online_mode_from_the_command_line(server, tmp_path, capsys):
    from swiftkv.cli import main

    out = tmp_path / "online.json"
    assert main(["bench", "--mode", "online", "--url", server[0].url, "--served-model-name", "tiny", "--workload",
                 "chat", "--num-requests", "2", "--concurrency", "2", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["ok"] == 2 and summary["errors"] == 0 and summary["ttft_p50"] > 0
    assert json.loads(capsys.readouterr().out)["requests"] == 2


def test_sessions_keep_servers_apart_and_rotate():
    """Who is up when: by default one server at a time, started afresh per point, a different one first at
    each point; every (server, point) pair runs exactly once in every isolation."""
    from swiftkv.bench.serving import sessions

    a, b, c = "a", "b", "c"  # sessions() only orders what it is given
    plan = sessions([a, b, c], 2)
    assert plan == [([a], [0]), ([b], [0]), ([c], [0]), ([b], [1]), ([c], [1]), ([a], [1])]
    assert sessions([a, b], 3, "server") == [([a], [0, 1, 2]), ([b], [0, 1, 2])]
    assert sessions([a, b], 2, "none") == [([a, b], [0, 1])]
    for isolation in ("point", "server", "none"):
        runs = [(s, i) for group, idx in sessions([a, b, c], 3, isolation) for s in group for i in idx]
        assert sorted(runs) == sorted((s, i) for s in (a, b, c) for i in range(3))
    assert sessions([], 2) == [] and sessions([], 2, "none") == []
    with pytest.raises(ValueError, match="unknown isolation"):
        sessions([a], 1, "all")
