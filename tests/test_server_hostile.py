"""The server against hostile and careless clients: a clear 4xx (never a 5xx) for every bad body,
auth and docs done right, body limits, admission, streaming that never garbles characters."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MODEL = "tiny"  # conftest.SERVED_MODEL


def _post(url: str, route: str, body: bytes | dict, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + route, content=content, headers={"content-type": "application/json", **kw.pop("headers", {})},
                      timeout=60, **kw)


@pytest.mark.parametrize("route,body,param", [
    ("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": ["ok", "x\\udfff"]}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "stop": ["\\ud800"]}', "stop"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    ("/v1/chat/completions",
     b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     "messages.0.content"),
])
def test_lone_surrogate_is_a_400_naming_the_field(server, route, body, param):
    r = _post(server[0].url, route, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "surrogate" in err["message"]


@pytest.mark.parametrize("field,value", [
    ("temperature", b"1e400"), ("temperature", b"Infinity"), ("temperature", b"NaN"), ("temperature", b"2.5"),
    ("temperature", b"-0.1"), ("top_p", b"1.5"), ("top_p", b"-1"), ("seed", str(2**70).encode()), ("top_k", b"-5"),
    ("frequency_penalty", b"2.5"), ("presence_penalty", b"-2.01"), ("repetition_penalty", b"0"),
    ("repetition_penalty", b"-1"), ("min_tokens", b"-1"), ("min_tokens", b"17"),  # > max_tokens (16 by default)
])
def test_out_of_range_sampling_is_a_400_naming_the_field(server, field, value):
    r = _post(server[0].url, "/v1/completions", b'{"model": "tiny", "prompt": "hi", "%s": %s}' % (field.encode(), value))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field
    if field == "seed":
        assert "9223372036854775807" in r.json()["error"]["message"]


def test_penalties_reach_the_engine_and_unknown_fields_are_ignored_with_a_warning(server, caplog):
    from swiftkv.server.protocol import CompletionRequest

    p = CompletionRequest(model=MODEL, prompt="x", frequency_penalty=1, presence_penalty=-0.5, repetition_penalty=1.2,
                          min_tokens=2).sampling_params(default_max_tokens=16)
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty, p.min_tokens) == (1, -0.5, 1.2, 2)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    plain = _post(server[0].url, "/v1/completions", body).json()["choices"][0]["text"]
    with caplog.at_level("WARNING", logger="swiftkv.server"):
        r = _post(server[0].url, "/v1/completions", {**body, "repetition_penalty": 2.0, "frequency_penalty": 2,
                                                     "not_a_field": 1, "guided_json": {}})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] != plain
    assert "ignored (not known to this server): 'guided_json', 'not_a_field'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="swiftkv.server"):
        r = _post(server[0].url, "/v1/completions", {**body, "max_tokens": 1, "x\nFORGED 200 OK\x1b[2J": 1,
                                                     "k" * 100_000: 1})
    assert r.status_code == 200
    line = next(rec.getMessage() for rec in caplog.records if "ignored" in rec.getMessage())
    assert "\n" not in line and "\x1b" not in line and len(line) < 300, line  # repr'd and cut: no forged log lines


def test_top_p_zero_means_the_most_likely_token(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 6, "ignore_eos": True}
    greedy = _post(server[0].url, "/v1/completions", {**body, "temperature": 0})
    top_p0 = _post(server[0].url, "/v1/completions", {**body, "temperature": 1.0, "top_p": 0, "seed": 3})
    assert top_p0.status_code == 200 and top_p0.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


@pytest.mark.parametrize("extra,needle", [
    ({"tool_choice": "required"}, "tool"), ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"logit_bias": {"5": 10}}, "logit_bias"),
])
def test_unsupported_features_are_refused_not_ignored(server, extra, needle):
    r = _post(server[0].url, "/v1/chat/completions",
              {"model": MODEL, "messages": [{"role": "user", "content": "x"}], **extra})
    assert r.status_code == 400 and needle in r.json()["error"]["message"]


def test_model_retrieve_and_openapi_error_responses(server):
    client = openai.OpenAI(base_url=server[0].url + "/v1", api_key="unused", max_retries=0)
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    spec = httpx.get(server[0].url + "/openapi.json").json()
    for route in ("/v1/completions", "/v1/chat/completions"):
        codes = spec["paths"][route]["post"]["responses"]
        assert {"400", "404", "413", "429"} <= set(codes), codes


def test_docs_behind_key_and_auth_details(serve):
    srv, _ = serve(api_key="sekret")
    assert httpx.get(srv.url + "/docs").status_code == 401 and httpx.get(srv.url + "/openapi.json").status_code == 401
    key = {"Authorization": "Bearer sekret"}
    assert httpx.get(srv.url + "/docs", headers=key).status_code == 404  # off unless enable_docs
    for header in ("Bearer sekret", "bearer sekret", "BEARER  sekret"):
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": header}).status_code == 200, header
    for header in ("Bearer sekret2", "Basic sekret", "sekret", "Bearer x sekret"):
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": header}).status_code == 401, header
    srv2, _ = serve(api_key="sekret", enable_docs=True)
    assert httpx.get(srv2.url + "/openapi.json").status_code == 200


def test_body_limit_413_and_tokenization_off_the_event_loop(serve):
    srv, app = serve(max_request_bytes=64 << 10)
    big = json.dumps({"model": MODEL, "prompt": "word " * 20000}).encode()
    r = _post(srv.url, "/v1/completions", big)
    assert r.status_code == 413 and "too large" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit applies while the body streams in
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    r = httpx.post(srv.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413, r.text
    # a tokenization that blocks must not block /health
    release, entered = threading.Event(), threading.Event()
    tokenizer = app.state.tokenizer
    real_encode = tokenizer.encode

    def slow(*a, **k):
        entered.set()
        release.wait(30)
        return real_encode(*a, **k)

    tokenizer.encode = slow
    try:
        with httpx.Client(timeout=60) as c:
            result = {}
            t = threading.Thread(target=lambda: result.setdefault("r", c.post(
                srv.url + "/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 2})))
            t.start()
            assert entered.wait(30)
            assert httpx.get(srv.url + "/health", timeout=10).status_code == 200  # while tokenizing
            release.set()
            t.join(30)
        assert result["r"].status_code == 200
    finally:
        del tokenizer.encode
        release.set()


def test_admission_counts_only_requests_really_waiting(serve):
    srv, _ = serve(max_waiting=16)  # 64 running slots

    async def burst():
        async with httpx.AsyncClient(timeout=120) as c:
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 24, "ignore_eos": True}
            return await asyncio.gather(*[c.post(srv.url + "/v1/completions", json=body) for _ in range(128)])

    codes = [r.status_code for r in asyncio.run(burst())]
    assert codes.count(200) >= 64 + 16 and set(codes) <= {200, 429}
    r = _post(srv.url, "/v1/completions", {"model": MODEL, "prompt": ["a"] * 10, "n": 9})  # 90 > 16 + 64: never
    assert r.status_code == 400 and "split it" in r.json()["error"]["message"]


def test_streamed_text_equals_non_streamed_text_with_multibyte_characters(server):
    body = {"model": MODEL, "prompt": "🚀 Ünïcödé 中文", "max_tokens": 200, "temperature": 1.0, "seed": 1,
            "ignore_eos": True}
    full = _post(server[0].url, "/v1/completions", body).json()["choices"][0]["text"]
    assert any(ord(ch) > 127 for ch in full)  # the sample does exercise multi-byte characters
    pieces = []
    with httpx.stream("POST", server[0].url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    assert "".join(pieces) == full and "\ufffd" not in "".join(pieces[:-1])


_json = st.recursive(st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=8)
_fields = {"model": st.just(MODEL) | _json, "prompt": st.text(max_size=30) | st.lists(st.integers(-5, 60000), max_size=5) | _json,
           "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                                       "content": st.text(max_size=30) | _json}), max_size=2) | _json,
           "max_tokens": st.integers(-2, 8) | _json, "temperature": st.floats() | _json, "top_p": st.floats() | _json,
           "n": st.integers(-1, 3) | _json, "stream": st.booleans() | _json, "seed": st.integers() | _json,
           "stop": st.text(max_size=5) | _json, "logprobs": st.integers(-1, 25) | st.booleans() | _json,
           "top_logprobs": st.integers(-1, 25) | _json, "stop_token_ids": _json, "top_k": st.integers(-3, 5) | _json}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       body=st.fixed_dictionaries({}, optional=_fields))
def test_fuzz_no_5xx(server, route, body):
    try:
        raw = json.dumps(body).encode()
    except ValueError:
        return
    r = _post(server[0].url, route, raw)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert r.json()["error"]["message"]


def test_fuzz_left_the_server_healthy(server):
    h = httpx.get(server[0].url + "/health", timeout=10).json()
    assert h["status"] == "ok"


@pytest.mark.parametrize("extra", [
    {"temperature": 1e-300}, {"temperature": 5e-324}, {"temperature": 1e-38}, {"top_p": 1e-300, "temperature": 1},
    {"repetition_penalty": 1e-300, "temperature": 1}, {"repetition_penalty": 1e-37, "temperature": 0.01},
    {"min_tokens": 2, "stop_token_ids": list(range(49152))},
])
def test_extreme_sampling_values_never_fail_other_requests(serve, extra):
    """Values that once built an inf/NaN distribution (and failed every request of their engine step) are a 400
    or are clamped to work, while three greedy requests run beside them to their last token."""
    srv, _ = serve()
    try:
        _concurrent_greedy_beside(srv.url, lambda: _post(srv.url, "/v1/completions",
                                                         {"model": MODEL, "prompt": "hi", "max_tokens": 8, **extra}),
                                  ok_statuses=(200, 400))
    finally:
        srv.stop()


def test_a_row_that_fails_fails_its_request_alone(serve, row_fault):
    """A sampling failure in one row (injected for one seed) answers that request with an error; the greedy
    requests in the same steps finish every token."""
    srv, _ = serve()
    try:
        statuses = _concurrent_greedy_beside(srv.url, lambda: _post(
            srv.url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 8, "temperature": 1,
                                         "seed": row_fault}), ok_statuses=(500,))
        assert statuses and set(statuses) == {500}
    finally:
        srv.stop()


def _concurrent_greedy_beside(url: str, send_bad, ok_statuses: tuple[int, ...], tokens: int = 60) -> list[int]:
    """Three greedy requests of ``tokens`` tokens; ``send_bad()`` sent over and over while they run. Asserts every
    greedy request got all its tokens and every bad one an allowed status; returns the bad ones' statuses."""
    results, statuses = [], []

    def greedy():
        r = _post(url, "/v1/completions", {"model": MODEL, "prompt": "hello there", "max_tokens": tokens,
                                           "temperature": 0, "ignore_eos": True})
        results.append((r.status_code, r.json()))

    threads = [threading.Thread(target=greedy) for _ in range(3)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) or not statuses:
        r = send_bad()
        statuses.append(r.status_code)
        assert r.status_code in ok_statuses, r.text
    for t in threads:
        t.join()
    for status, body in results:
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == tokens and body["choices"][0]["finish_reason"] == "length"
    return statuses


def test_stop_strings_are_capped(server):
    r = _post(server[0].url, "/v1/completions", {"model": MODEL, "prompt": "hi", "stop": [f"s{i}" for i in range(17)]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
    assert "at most 16 strings" in r.json()["error"]["message"]
    r = _post(server[0].url, "/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["x" * 513]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text


def test_unauthenticated_clients_are_refused_before_their_body_is_read(serve, tiny_chat_model_dir):
    """With a key set, a client without it gets its 401 from the headers alone: the server does not wait for (or
    parse) a body of several MB. And an empty key (an unset shell variable) is refused at start."""
    import socket

    from conftest import start_server

    srv, _ = serve(api_key="sekret")
    try:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 4000000\r\n\r\n" + b"[" * 1000)  # the rest of the body never comes
        reply = sock.recv(4096)
        sock.close()
        assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="API key is empty"):
        start_server(tiny_chat_model_dir, api_key="  ")


def test_a_prompt_too_long_to_fit_is_refused_before_tokenizing(server):
    srv, app = server
    tokenizer, calls = app.state.tokenizer, []
    real = tokenizer.encode
    tokenizer.encode = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        r = _post(srv.url, "/v1/completions", {"model": MODEL, "prompt": "word " * 200_000, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "characters" in r.text, r.text
        r = _post(srv.url, "/v1/chat/completions", {"model": MODEL, "max_tokens": 1,
                                                   "messages": [{"role": "user", "content": "word " * 200_000}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert not calls
    finally:
        del tokenizer.encode


def test_long_prompts_do_not_hold_up_short_ones():
    """Two tokenizer lanes: while a long prompt's tokenization is stuck, a short one is tokenized."""
    from swiftkv.server.tokenize import SHORT_PROMPT_CHARS, TokenizerLanes

    release = threading.Event()

    class Tok:
        def get_vocab(self):
            return {"abc": 0, "d": 1}

        def encode(self, text):
            if len(text) > SHORT_PROMPT_CHARS:
                release.wait(30)
            return [len(text)]

    lanes = TokenizerLanes(Tok(), max_model_len=1 << 20)

    async def main():
        long = asyncio.ensure_future(lanes.run(SHORT_PROMPT_CHARS + 1, lambda t: t.encode("x" * (SHORT_PROMPT_CHARS + 1))))
        short = await asyncio.wait_for(lanes.run(5, lambda t: t.encode("hello")), timeout=10)
        assert not long.done()
        release.set()
        return short, await long

    try:
        assert asyncio.run(main()) == ([5], [SHORT_PROMPT_CHARS + 1])
    finally:
        release.set()
        lanes.shutdown()
    assert lanes.too_long(2 * 3 * (1 << 20) + 1) and lanes.too_long(2 * 3 * (1 << 20)) is None


def test_cache_salt_is_accepted_and_checked(server):
    ok = _post(server[0].url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1, "cache_salt": "t1"})
    assert ok.status_code == 200, ok.text
    bad = _post(server[0].url, "/v1/completions", {"model": MODEL, "prompt": "hi", "cache_salt": ""})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt", bad.text


@pytest.mark.parametrize("argv,match", [
    (["--kv-cache-gb", "inf"], "--kv-cache-gb must be a finite number > 0, got inf"),
    (["--kv-cache-gb", "nan"], "--kv-cache-gb must be a finite number"),
    (["--port", "70000"], "--port must be a finite number >= 0 and <= 65535"),
    (["--max-request-bytes", "0"], "--max-request-bytes must be"),
    (["--request-timeout", "-5"], "--request-timeout must be a finite number > 0"),
    (["--request-timeout", "nan"], "--request-timeout must be"),
    (["--max-waiting", "-1"], "--max-waiting must be"),
    (["--api-key", ""], "--api-key is empty"),
    (["--dtype", "float16"], "float16 does not run on the CPU path"),
])
def test_serve_refuses_impossible_settings_at_start(tiny_chat_model_dir, capsys, argv, match):
    from swiftkv.cli import main

    assert main(["serve", str(tiny_chat_model_dir), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and match in err[-1] and "Traceback" not in "\n".join(err), err


def test_non_finite_logprobs_are_json_null():
    """A -inf logprob (a masked alternative) is null in both bodies, never a bare -Infinity (invalid JSON) or a
    500 from a strict encoder."""
    from swiftkv.outputs import CompletionOutput, Logprob
    from swiftkv.server import responses as R

    class Tok:
        def decode(self, ids):
            return f"t{ids[0]}"

    c = CompletionOutput(0, "t1", [1], "length",
                         [Logprob(1, float("-inf"), {1: float("-inf"), 2: float("nan"), 3: -0.5})])
    for body in (R._completion_logprobs(c, Tok()), R._chat_logprobs(c, Tok())):
        text = json.dumps(body, allow_nan=False)  # raises on a non-finite number
        assert "null" in text and "-0.5" in text
