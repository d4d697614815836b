"""FastAPI routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from swiftkv.outputs import CompletionOutput
from swiftkv.server import responses as R
from swiftkv.server.async_engine import (
    AsyncEngine,
    EngineDeadError,
    OutputMailbox,
    QueueFullError,
)
from swiftkv.server.auth import ApiKeyGate, authorized
from swiftkv.server.body_limit import BodySizeLimit
from swiftkv.server.errors import ERRORS, APIError, add_error_handlers
from swiftkv.server.protocol import ChatCompletionRequest, CompletionRequest, error_body
from swiftkv.server.tokenize import TokenizerLanes

MAX_REQUEST_BYTES = 4 << 20  # default body limit (413 above it)
@dataclass(frozen=True)
class ServerConfig:
    """What the routes read from ``app.state.config`` (the engine and the tokenizer lanes are ``app.state.engine``
    and ``app.state.lanes``, started and stopped in the app's lifespan)."""

    llm: object  # swiftkv.llm.LLM
    model_name: str
    api_key: str | None
    max_waiting: int
    request_timeout: float
    shutdown_grace: float

    @property
    def card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "swiftkv",
                "max_model_len": self.llm.engine.max_model_len}


def build_app(llm, model_name: str, api_key: str | None = None, max_waiting: int = 256,
              request_timeout: float = 600.0, shutdown_grace: float = 30.0, enable_docs: bool | None = None,
              max_request_bytes: int = MAX_REQUEST_BYTES) -> FastAPI:
    """The ASGI app over an :class:`~swiftkv.llm.LLM`: its engine runs in a background thread from the app's
    startup to its shutdown (the lifespan), the routes (:data:`router`) read ``app.state``.

    ``/docs`` and ``/openapi.json`` are served unless an ``api_key`` is set (then only with
    ``enable_docs=True``). Bodies over ``max_request_bytes`` get a 413 before they are parsed.
    """
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty (an unset shell variable?); give a non-empty --api-key, or none")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = AsyncEngine(llm.engine, max_waiting=max_waiting)
        # tokenizing a long prompt takes a while: off the event loop, so /health and streams stay responsive, and
        # in two lanes, so long prompts never hold up short ones
        app.state.lanes = TokenizerLanes(llm.tokenizer, llm.engine.max_model_len)
        yield
        await app.state.engine.shutdown(shutdown_grace)
        app.state.lanes.shutdown()

    docs = enable_docs if enable_docs is not None else api_key is None
    app = FastAPI(title="swiftkv", lifespan=lifespan, docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    # the key is checked from the headers before the body is read (added last: runs first)
    app.add_middleware(ApiKeyGate, api_key=api_key,
                       open_paths=frozenset({"/health"} | ({"/docs", "/docs/oauth2-redirect", "/openapi.json"}
                                                           if docs else set())))
    app.state.config = ServerConfig(llm, model_name, api_key, max_waiting, request_timeout, shutdown_grace)
    app.state.tokenizer = llm.tokenizer
    add_error_handlers(app)
    app.include_router(router)
    return app


router = APIRouter()


def _check_model(config: ServerConfig, name: str) -> None:
    if name != config.model_name:
        raise APIError(404, f"model {name!r} does not exist; this server serves {config.model_name!r}",
                       "not_found_error", "model")


@router.get("/health")
async def health(request: Request):
    """Liveness for anyone; the engine's counters (prefix-cache hits among them) only with the key, if set."""
    if not authorized(dict(request.scope["headers"]), request.app.state.config.api_key):
        return {"status": "ok"}
    return {"status": "ok", **request.app.state.engine.stats()}


@router.get("/metrics")
async def metrics(request: Request):
    engine = request.app.state.engine
    engine.metrics.set_state(engine.stats())
    return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models", responses=ERRORS)
async def models(request: Request):
    return {"object": "list", "data": [request.app.state.config.card]}


@router.get("/v1/models/{model_id:path}", responses=ERRORS)
async def model_card(model_id: str, request: Request):
    _check_model(request.app.state.config, model_id)
    return request.app.state.config.card


def _encode(tok, prompt) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        return tok.encode(prompt)
    return list(prompt)


def _prompt_chars(lanes: TokenizerLanes, chars: int, param: str) -> int:
    """``chars``, after refusing a prompt that long (400) before it is tokenized: no text that long fits."""
    if (why := lanes.too_long(chars)) is not None:
        raise APIError(400, why, param=param)
    return chars


def _check_admissible(config: ServerConfig, num_requests: int) -> None:
    most = config.max_waiting + config.llm.engine.scheduler.max_num_seqs
    if num_requests > most:
        raise APIError(400, f"this request needs {num_requests} sequences (prompts x n) but the server admits at "
                       f"most {most} at once (--max-waiting {config.max_waiting} + max_num_seqs); split it", param="n")


@router.post("/v1/completions", responses=ERRORS)
async def completions(req: CompletionRequest, request: Request):
    arrival = time.monotonic()  # TTFT counts from here, tokenization included (as the client sees it)
    state = request.app.state
    config, lanes, tokenizer = state.config, state.lanes, state.tokenizer
    _check_model(config, req.model)
    params = _params(req)
    prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) else [req.prompt]
    if not prompts:
        raise APIError(400, "prompt is empty", param="prompt")
    _check_admissible(config, len(prompts) * req.n)
    lengths = [len(p) for p in prompts if isinstance(p, str)]
    _prompt_chars(lanes, max(lengths, default=0), "prompt")  # each prompt must fit on its own
    jobs = await lanes.run(sum(lengths), lambda tok: [(_encode(tok, p), p if isinstance(p, str) else None)
                                                      for p in prompts])
    rid = f"cmpl-{uuid.uuid4().hex}"
    stream = _run(state.engine, rid, jobs, params, request, config.request_timeout, arrival, req.cache_salt)
    if req.stream:
        first = await _first(stream)
        return _sse(R.completion_chunks(rid, config.model_name, first, stream, tokenizer, req, jobs))
    outs = [o async for o in stream]
    return R.completion_response(rid, config.model_name, outs, tokenizer, jobs)


@router.post("/v1/chat/completions", responses=ERRORS)
async def chat(req: ChatCompletionRequest, request: Request):
    arrival = time.monotonic()
    state = request.app.state
    config, lanes, tokenizer = state.config, state.lanes, state.tokenizer
    _check_model(config, req.model)
    params = _params(req)
    _check_admissible(config, req.n)
    conversation = req.conversation()
    chars = _prompt_chars(lanes, sum(len(str(m.get("content") or "")) for m in conversation), "messages")
    try:
        ids = list(await lanes.run(chars, lambda tok: tok.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=False)))
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from e
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    stream = _run(state.engine, rid, [(ids, None)], params, request, config.request_timeout, arrival, req.cache_salt)
    if req.stream:
        first = await _first(stream)
        return _sse(R.chat_chunks(rid, config.model_name, first, stream, tokenizer, req, len(ids)))
    outs = [o async for o in stream]
    return R.chat_response(rid, config.model_name, outs, tokenizer, len(ids))


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
