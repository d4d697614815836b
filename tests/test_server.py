"""The OpenAI-compatible server on loopback: the official client, bad input, load, faults."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

MODEL = "tiny"  # conftest.SERVED_MODEL


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key="unused", max_retries=0)


def test_completions_non_streaming(client):
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + 7
    r2 = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    assert r2.choices[0].text == r.choices[0].text  # greedy is deterministic


def test_completions_streaming_with_usage(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Hello there", max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    ref = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert text == ref.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6 and not chunks[-1].choices


def test_chat_non_streaming_and_streaming(client):
    msgs = [{"role": "user", "content": "Say hi"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_n_seed_stop_and_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Once", max_tokens=4, n=3, seed=5, temperature=1.0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2] and r.usage.completion_tokens == 12
    assert all(len(c.logprobs.token_logprobs) == 4 and len(c.logprobs.top_logprobs[0]) <= 2 for c in r.choices)
    again = client.completions.create(model=MODEL, prompt="Once", max_tokens=4, n=3, seed=5, temperature=1.0,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                          logprobs=True, top_logprobs=2, temperature=0, extra_body={"ignore_eos": True})
    assert len(chat.choices[0].logprobs.content) == 3
    full = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    stop = full.choices[0].text[2:4]
    cut = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text


BAD = [
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi", max_tokens', 400, "malformed JSON"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, "UTF-8"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "max_tokens": "5"}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "temperature": "hot"}', 400, "temperature"),
    ("/v1/completions", b'{"model": "nope", "prompt": "hi"}', 404, "does not exist"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "max_tokens": -3}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "max_tokens": 10000000}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "' + b"word " * 700 + b'"}', 400, "context"),
    ("/v1/completions", b'{"model": "tiny", "prompt": ""}', 400, "empty"),
    ("/v1/completions", b'{"model": "tiny", "prompt": [99999999]}', 400, "token ids"),
    ("/v1/completions", b'{"prompt": "hi"}', 400, "model"),
    ("/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}', 400, "role"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": "hi"}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": 7}', 400, "top_p"),
]


@pytest.mark.parametrize("route,body,status,needle", BAD)
def test_bad_input_gets_openai_error_and_server_survives(server, route, body, status, needle):
    url = server[0].url
    r = httpx.post(url + route, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle.lower() in err["message"].lower() and err["type"]
    assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"


def test_models_health_metrics(server):
    url = server[0].url
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == MODEL
    text = httpx.get(url + "/metrics").text
    for name in ("swiftkv_time_to_first_token_seconds_bucket", "swiftkv_time_per_output_token_seconds_bucket",
                 "swiftkv_num_requests_running", "swiftkv_num_requests_waiting", "swiftkv_kv_blocks_used",
                 "swiftkv_kv_blocks_free", "swiftkv_prompt_tokens_total", "swiftkv_generation_tokens_total",
                 "swiftkv_requests_total"):
        assert name in text


async def _stream_request(url: str, n_tokens: int, disconnect_after: int | None = None) -> int:
    body = {"model": MODEL, "prompt": "The story begins", "max_tokens": n_tokens, "stream": True,
            "temperature": 0.7, "ignore_eos": True}
    got = 0
    async with httpx.AsyncClient(timeout=120) as c:
        async with c.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    got += 1
                    if disconnect_after is not None and got >= disconnect_after:
                        return got  # leaving the context closes the connection mid-stream
    return got


def _wait_blocks_free(url: str, timeout: float = 30.0, headers: dict | None = None) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = httpx.get(url + "/health", headers=headers).json()
        if h["kv_blocks_used"] == 0 and h["running"] == 0 and h["waiting"] == 0:
            return h
        time.sleep(0.1)
    return h


def test_load_64_concurrent_streams_then_32_disconnects(server):
    url = server[0].url

    async def main():
        full = await asyncio.gather(*[_stream_request(url, 12) for _ in range(64)])
        cut = await asyncio.gather(*[_stream_request(url, 200, disconnect_after=3) for _ in range(32)])
        return full, cut

    full, cut = asyncio.run(main())
    assert full == [12] * 64  # one chunk per token
    assert all(c == 3 for c in cut)
    h = _wait_blocks_free(url)
    assert h["kv_blocks_used"] == 0 and h["running"] == 0


def test_queue_full_and_api_key(serve):
    srv, app = serve(api_key="sekret", max_waiting=2, max_num_seqs=1)
    try:
        url = srv.url
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi"}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url + "/health").status_code == 200  # health needs no key
        ok = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert ok.models.list().data[0].id == MODEL

        async def flood():
            async with httpx.AsyncClient(timeout=120, headers={"Authorization": "Bearer sekret"}) as c:
                body = {"model": MODEL, "prompt": "hi", "max_tokens": 40, "ignore_eos": True}
                return await asyncio.gather(*[c.post(url + "/v1/completions", json=body) for _ in range(12)])

        codes = [r.status_code for r in asyncio.run(flood())]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        r429 = next(r for r in asyncio.run(flood()) if r.status_code == 429)
        assert r429.headers["retry-after"] and r429.json()["error"]["type"] == "rate_limit_error"
        assert _wait_blocks_free(url, headers={"Authorization": "Bearer sekret"})["kv_blocks_used"] == 0
        assert httpx.get(url + "/health").json() == {"status": "ok"}  # no counters without the key
        assert httpx.get(url + "/metrics").status_code == 401
        assert "swiftkv_prefix_cache" in httpx.get(url + "/metrics", headers={"Authorization": "Bearer sekret"}).text
    finally:
        srv.stop()


def test_engine_error_fails_only_its_requests(serve):
    srv, app = serve()
    try:
        runner = app.state.engine.engine.runner
        real = runner.execute
        calls = {"n": 0}

        def flaky(out):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected fault")
            return real(out)

        runner.execute = flaky
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3}, timeout=30)
        assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200  # the engine kept serving
        assert _wait_blocks_free(srv.url)["kv_blocks_used"] == 0
    finally:
        srv.stop()


def test_request_timeout(serve):
    srv, app = serve(request_timeout=0.3)
    try:
        runner = app.state.engine.engine.runner
        real = runner.execute
        runner.execute = lambda out: (time.sleep(0.2), real(out))[1]
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 50, "ignore_eos": True}, timeout=30)
        assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
        runner.execute = real
        assert _wait_blocks_free(srv.url)["kv_blocks_used"] == 0
    finally:
        srv.stop()


def test_graceful_shutdown_finishes_in_flight_stream(serve):
    srv, app = serve()
    runner = app.state.engine.engine.runner
    real = runner.execute
    runner.execute = lambda out: (time.sleep(0.02), real(out))[1]  # ~0.6 s for 30 tokens

    async def main():
        task = asyncio.create_task(_stream_request(srv.url, 30))
        await asyncio.sleep(0.2)
        srv.server.should_exit = True  # like SIGTERM: stop accepting, drain in-flight work
        return await task

    assert asyncio.run(main()) == 30
    srv.thread.join(timeout=30)
    assert not srv.thread.is_alive()


def _histogram_sum(metrics_text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in metrics_text.splitlines() if line.startswith(name + "_sum"))


def test_ttft_metric_counts_from_the_request_not_from_the_engine(serve, monkeypatch):
    """What /metrics calls time to first token includes tokenization, as the client's TTFT does (vLLM counts
    from arrival too): with a tokenizer slowed by 0.4 s, the one request's TTFT is at least that."""
    srv, app = serve()
    tok = app.state.tokenizer
    slow = tok.encode

    def encode(*a, **kw):
        time.sleep(0.4)
        return slow(*a, **kw)

    monkeypatch.setattr(tok, "encode", encode)
    sent = time.monotonic()
    r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "Hello there", "max_tokens": 2,
                                                       "ignore_eos": True}, timeout=60)
    took = time.monotonic() - sent
    assert r.status_code == 200
    ttft = _histogram_sum(httpx.get(srv.url + "/metrics").text, "swiftkv_time_to_first_token_seconds")
    assert 0.4 <= ttft <= took


def test_a_reader_that_stops_reading_holds_a_bounded_mailbox(tiny_chat_model_dir):
    """The engine thread runs on while a handler does not read: its mailbox keeps at most ``keep`` cumulative
    outputs per engine request (it was one per step, unbounded: a client that never read its socket grew the
    server by GBs), and the last one read is complete."""
    from swiftkv.llm import LLM
    from swiftkv.sampling_params import SamplingParams
    from swiftkv.server.async_engine import AsyncEngine

    llm = LLM(tiny_chat_model_dir, dtype="float32", kv_cache_memory=64 << 20)
    engine = AsyncEngine(llm.engine)

    async def main():
        box = engine.submit("slow", [5, 6, 7], SamplingParams(n=1, max_tokens=120, ignore_eos=True, logprobs=5))
        peak = 0
        while "slow" in engine._requests:  # until the engine finished it, nothing read
            peak = max(peak, box.qsize())
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        outs = [await box.get() for _ in range(box.qsize())]
        return peak, outs

    try:
        peak, outs = asyncio.run(main())
    finally:
        asyncio.run(engine.shutdown(grace_s=0))
    assert 1 <= peak <= 4 and len(outs) <= 4
    assert [len(o.outputs[0].token_ids) for o in outs] == sorted(len(o.outputs[0].token_ids) for o in outs)
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 120 and len(outs[-1].outputs[0].logprobs) == 120


def test_a_client_that_never_reads_its_stream(serve):
    """A raw socket with a tiny receive buffer asks for a long, fat stream and never reads: the server holds a
    bounded mailbox for it meanwhile, and when the client goes, the request is aborted and its KV freed."""
    import json
    import socket

    srv, app = serve()
    try:
        engine = app.state.engine
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 320, "n": 16, "logprobs": 20, "stream": True,
                           "ignore_eos": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline, peak, seen = time.monotonic() + 60, 0, None
        while time.monotonic() < deadline:
            reqs = list(engine._requests.values())
            seen = seen or (reqs[0] if reqs else None)
            peak = max([peak] + [r.queue.qsize() for r in reqs])
            if seen is not None and seen.tokens >= 16 * 320:  # the engine is done; the client read (almost) nothing
                break
            time.sleep(0.02)
        assert seen is not None and seen.tokens == 16 * 320
        assert 1 < peak <= 4, peak  # the handler fell behind, and held a few outputs, not one per step (320)
        sock.close()
        h = _wait_blocks_free(srv.url)
        assert h["kv_blocks_used"] == 0 and h["running"] == 0
        deadline = time.monotonic() + 30
        while engine._requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine._requests  # nothing kept for the client that went
    finally:
        srv.stop()


def test_stats_are_a_snapshot_the_engine_thread_publishes(tiny_chat_model_dir):
    """/health and /metrics read the counters the engine thread published after its latest step: the scheduler
    and block manager are read on the engine thread only, never across threads while a step changes them."""
    import threading

    from swiftkv.llm import LLM
    from swiftkv.sampling_params import SamplingParams
    from swiftkv.server.async_engine import AsyncEngine

    llm = LLM(tiny_chat_model_dir, dtype="float32", kv_cache_memory=64 << 20)
    readers: set[str] = set()
    sched = llm.engine.scheduler

    class Watched(type(sched)):  # the scheduler, noting which thread reads its queues
        @property
        def running(self):
            readers.add(threading.current_thread().name)
            return self.__dict__["running"]

    sched.__class__ = Watched
    engine = AsyncEngine(llm.engine)
    seen = []

    async def main():
        box = engine.submit("r", [5, 6, 7], SamplingParams(n=1, max_tokens=40, ignore_eos=True))
        while "r" in engine._requests:
            seen.append(engine.stats()["running"])  # as /health does, from the event loop's thread
            await asyncio.sleep(0.002)
        while box.qsize():
            await box.get()
        await asyncio.sleep(0.6)  # the idle engine thread publishes again
        seen.append(engine.stats()["running"])

    try:
        readers.clear()
        asyncio.run(main())
    finally:
        asyncio.run(engine.shutdown(grace_s=0))
    assert readers == {"swiftkv-engine"}, readers
    assert 1 in seen and seen[-1] == 0  # the snapshot followed the request: running, then done
