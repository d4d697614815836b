"""FastAPI routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from swiftkv.outputs import RequestOutput
from swiftkv.server.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from swiftkv.server.protocol import ChatCompletionRequest, CompletionRequest, error_body
from swiftkv.server import responses as R


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


def build_app(llm, model_name: str, api_key: str | None = None, max_waiting: int = 256,
              request_timeout: float = 600.0, shutdown_grace: float = 30.0) -> FastAPI:
    """The ASGI app over an :class:`~swiftkv.llm.LLM` (its engine runs in a background thread)."""
    engine = AsyncEngine(llm.engine, max_waiting=max_waiting)
    tokenizer = llm.tokenizer
    max_model_len = llm.engine.max_model_len

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await engine.shutdown(shutdown_grace)

    app = FastAPI(title="swiftkv", lifespan=lifespan)
    app.state.engine = engine

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
        msg = f"{field}: {err.get('msg', 'invalid value')}" if field else err.get("msg", "invalid request")
        return JSONResponse(error_body(msg, param=field), status_code=400)

    def check_key(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)", "authentication_error")

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}", "not_found_error",
                           "model")

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    @app.get("/metrics")
    async def metrics():
        engine.metrics.set_state(engine.stats())
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "swiftkv",
                                            "max_model_len": max_model_len}]}

    def encode(prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt is empty", param="prompt")
            return tokenizer(prompt)["input_ids"]
        return list(prompt)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        params = _params(req)
        prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) else [req.prompt]
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        jobs = [(encode(p), p if isinstance(p, str) else None) for p in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        stream = _run(engine, rid, jobs, params, req.n, request, request_timeout)
        if req.stream:
            first = await _first(stream)
            return _sse(R.completion_chunks(rid, model_name, first, stream, tokenizer, req, jobs))
        outs = [o async for o in stream]
        return R.completion_response(rid, model_name, outs, tokenizer, jobs)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        params = _params(req)
        try:
            ids = list(tokenizer.apply_chat_template(req.conversation(), add_generation_prompt=True, tokenize=True,
                                                     return_dict=False))
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = _run(engine, rid, [(ids, None)], params, req.n, request, request_timeout)
        if req.stream:
            first = await _first(stream)
            return _sse(R.chat_chunks(rid, model_name, first, stream, tokenizer, req, len(ids)))
        outs = [o async for o in stream]
        return R.chat_response(rid, model_name, outs, tokenizer, len(ids))

    return app


def _params(req):
    try:
        return req.sampling_params(default_max_tokens=16 if isinstance(req, CompletionRequest) else 512)
    except ValueError as e:
        raise APIError(400, str(e)) from e


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


async def _run(engine: AsyncEngine, rid: str, jobs: list[tuple[list[int], str | None]], params, n: int,
               request: Request, timeout: float) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Submit ``len(jobs) * n`` engine requests; yield (choice index, cumulative output) as they advance.

    Aborts every unfinished request when the client disconnects, the timeout passes, or the
    consumer stops early (e.g. a cancelled stream).
    """
    queue: asyncio.Queue = asyncio.Queue()
    sub_ids: dict[str, int] = {}
    try:
        for j, (ids, text) in enumerate(jobs):
            for i in range(n):
                p = params if n == 1 else replace(params, seed=None if params.seed is None else params.seed + i)
                sid = f"{rid}-{j * n + i}"
                engine.submit(sid, ids, p, text, queue)
                sub_ids[sid] = j * n + i
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
            yield sub_ids[item.request_id], item
    finally:
        for sid in unfinished:
            engine.abort(sid)
