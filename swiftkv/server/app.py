"""FastAPI routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from swiftkv.outputs import CompletionOutput
from swiftkv.server.async_engine import AsyncEngine, EngineDeadError, OutputMailbox, QueueFullError
from swiftkv.server.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse, error_body
from swiftkv.server import responses as R
from swiftkv.server.auth import ApiKeyGate, authorized
from swiftkv.server.body_limit import BodySizeLimit
from swiftkv.server.tokenize import TokenizerLanes

MAX_REQUEST_BYTES = 4 << 20  # default body limit (413 above it)
# what the OpenAPI document lists for the /v1 routes (every error has OpenAI's error body)
ERRORS = {code: {"model": ErrorResponse, "description": what} for code, what in {
    400: "invalid request (the message names the field)", 401: "missing or wrong API key",
    404: "unknown model", 413: "request body too large", 429: "server busy: retry after Retry-After seconds",
    500: "generation failed", 503: "server shutting down", 504: "request timed out"}.items()}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


def build_app(llm, model_name: str, api_key: str | None = None, max_waiting: int = 256,
              request_timeout: float = 600.0, shutdown_grace: float = 30.0, enable_docs: bool | None = None,
              max_request_bytes: int = MAX_REQUEST_BYTES) -> FastAPI:
    """The ASGI app over an :class:`~swiftkv.llm.LLM` (its engine runs in a background thread).

    ``/docs`` and ``/openapi.json`` are served unless an ``api_key`` is set (then only with
    ``enable_docs=True``). Bodies over ``max_request_bytes`` get a 413 before they are parsed.
    """
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty (an unset shell variable?); give a non-empty --api-key, or none")
    engine = AsyncEngine(llm.engine, max_waiting=max_waiting)
    tokenizer = llm.tokenizer
    max_model_len = llm.engine.max_model_len
    # tokenizing a long prompt takes a while: off the event loop, so /health and streams stay responsive, and in
    # two lanes, so long prompts never hold up short ones
    lanes = TokenizerLanes(tokenizer, max_model_len)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await engine.shutdown(shutdown_grace)
        lanes.shutdown()

    docs = enable_docs if enable_docs is not None else api_key is None
    app = FastAPI(title="swiftkv", lifespan=lifespan, docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    # the key is checked from the headers before the body is read (added last: runs first)
    app.add_middleware(ApiKeyGate, api_key=api_key,
                       open_paths=frozenset({"/health"} | ({"/docs", "/docs/oauth2-redirect", "/openapi.json"}
                                                           if docs else set())))
    app.state.engine, app.state.tokenizer = engine, tokenizer

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = "request body is not valid UTF-8 JSON" if "parsing the body" in str(e.detail) else str(e.detail)
        return JSONResponse(error_body(msg), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", []) if x != "body"]
        if err.get("type") == "json_invalid":
            return JSONResponse(error_body(f"malformed JSON body: {err.get('msg', '')}"), status_code=400)
        field = ".".join(loc) or None
        text = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if not field and err.get("type") == "model_attributes_type":
            text = "the request body must be a JSON object"
        msg = f"{field}: {text}" if field else text
        return JSONResponse(error_body(msg, param=field), status_code=400)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}", "not_found_error",
                           "model")

    @app.get("/health")
    async def health(request: Request):
        """Liveness for anyone; the engine's counters (prefix-cache hits among them) only with the key, if set."""
        if not authorized(dict(request.scope["headers"]), api_key):
            return {"status": "ok"}
        return {"status": "ok", **engine.stats()}

    @app.get("/metrics")
    async def metrics():
        engine.metrics.set_state(engine.stats())
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    card = {"id": model_name, "object": "model", "created": 0, "owned_by": "swiftkv", "max_model_len": max_model_len}

    @app.get("/v1/models", responses=ERRORS)
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}", responses=ERRORS)
    async def model_card(model_id: str):
        check_model(model_id)
        return card

    def encode(tok, prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt is empty", param="prompt")
            return tok.encode(prompt)
        return list(prompt)

    def prompt_chars(chars: int, param: str) -> int:
        """``chars``, after refusing a prompt that long (400) before it is tokenized: no text that long fits."""
        if (why := lanes.too_long(chars)) is not None:
            raise APIError(400, why, param=param)
        return chars

    def check_admissible(num_requests: int) -> None:
        most = max_waiting + llm.engine.scheduler.max_num_seqs
        if num_requests > most:
            raise APIError(400, f"this request needs {num_requests} sequences (prompts x n) but the server admits at "
                           f"most {most} at once (--max-waiting {max_waiting} + max_num_seqs); split it", param="n")

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(req: CompletionRequest, request: Request):
        arrival = time.monotonic()  # TTFT counts from here, tokenization included (as the client sees it)
        check_model(req.model)
        params = _params(req)
        prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) else [req.prompt]
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        check_admissible(len(prompts) * req.n)
        lengths = [len(p) for p in prompts if isinstance(p, str)]
        prompt_chars(max(lengths, default=0), "prompt")  # each prompt must fit on its own
        jobs = await lanes.run(sum(lengths), lambda tok: [(encode(tok, p), p if isinstance(p, str) else None)
                                                          for p in prompts])
        rid = f"cmpl-{uuid.uuid4().hex}"
        stream = _run(engine, rid, jobs, params, request, request_timeout, arrival, req.cache_salt)
        if req.stream:
            first = await _first(stream)
            return _sse(R.completion_chunks(rid, model_name, first, stream, tokenizer, req, jobs))
        outs = [o async for o in stream]
        return R.completion_response(rid, model_name, outs, tokenizer, jobs)

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat(req: ChatCompletionRequest, request: Request):
        arrival = time.monotonic()
        check_model(req.model)
        params = _params(req)
        check_admissible(req.n)
        conversation = req.conversation()
        chars = prompt_chars(sum(len(str(m.get("content") or "")) for m in conversation), "messages")
        try:
            ids = list(await lanes.run(chars, lambda tok: tok.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=False)))
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = _run(engine, rid, [(ids, None)], params, request, request_timeout, arrival, req.cache_salt)
        if req.stream:
            first = await _first(stream)
            return _sse(R.chat_chunks(rid, model_name, first, stream, tokenizer, req, len(ids)))
        outs = [o async for o in stream]
        return R.chat_response(rid, model_name, outs, tokenizer, len(ids))

    return app


def _params(req):
    try:
        return req.sampling_params(default_max_tokens=16 if isinstance(req, CompletionRequest) else 512)
    except ValueError as e:  # "min_tokens must be ...": the field the message starts with, where it is one
        first = str(e).split(" ", 1)[0]
        raise APIError(400, str(e), param=first if first in type(req).model_fields else None) from e


async def _first(stream: AsyncIterator):
    """Start a stream, so that errors before the first token become HTTP errors, not SSE."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        try:
            async for c in chunks:
                yield f"data: {json.dumps(c)}\n\n"
        except APIError as e:  # after the first token the status is sent: report in-band
            yield f"data: {json.dumps(error_body(e.message, e.type, e.param))}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")


async def _run(engine: AsyncEngine, rid: str, jobs: list[tuple[list[int], str | None]], params,
               request: Request, timeout: float, arrival: float,
               salt: str | None = None) -> AsyncIterator[tuple[int, CompletionOutput]]:
    """Submit one engine request of ``n`` samples per prompt; yield (choice index, cumulative
    completion) whenever a choice advances (choice ``j * n + i``: sample i of prompt j). ``arrival``
    (``time.monotonic()``): when the HTTP request came in, for the TTFT metric.

    Aborts every unfinished request when the client disconnects, the timeout passes, or the
    consumer stops early (e.g. a cancelled stream).
    """
    queue = OutputMailbox()  # a slow reader holds a few outputs per sub-request, not one per step
    sub_ids: dict[str, int] = {}
    n = params.n
    try:
        for j, (ids, text) in enumerate(jobs):
            sid = f"{rid}-{j}"
            engine.submit(sid, ids, params, text, queue, arrival, salt)
            sub_ids[sid] = j
    except QueueFullError as e:
        for sid in sub_ids:
            engine.abort(sid)
        raise APIError(429, f"server busy: {e}; retry later", "rate_limit_error", headers={"Retry-After": "1"}) from e
    except EngineDeadError as e:
        raise APIError(503, str(e), "server_error", headers={"Retry-After": "5"}) from e
    except ValueError as e:
        for sid in sub_ids:
            engine.abort(sid)
        raise APIError(400, str(e), param="prompt") from e
    deadline = time.monotonic() + timeout
    unfinished = set(sub_ids)
    sent: dict[int, tuple[int, str | None]] = {}  # choice -> (tokens, finish reason) already yielded
    try:
        while unfinished:
            try:
                item = await asyncio.wait_for(queue.get(), timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except asyncio.TimeoutError:
                if time.monotonic() >= deadline:
                    raise APIError(504, f"request timed out after {timeout:.0f}s", "timeout_error") from None
                if await request.is_disconnected():
                    return
                continue
            if isinstance(item, BaseException):
                if isinstance(item, ValueError):
                    raise APIError(400, str(item))
                raise APIError(500 if not isinstance(item, EngineDeadError) else 503,
                               f"generation failed: {item}", "server_error")
            if item.finished:
                unfinished.discard(item.request_id)
            for c in item.outputs:
                index = sub_ids[item.request_id] * n + c.index
                if sent.get(index) != (len(c.token_ids), c.finish_reason):
                    sent[index] = (len(c.token_ids), c.finish_reason)
                    yield index, c
    finally:
        for sid in unfinished:
            engine.abort(sid)
