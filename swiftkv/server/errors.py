"""The server's errors: :class:`APIError` (raised by the routes) and the handlers that answer every error with
OpenAI's error body."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from swiftkv.server.protocol import ErrorResponse, error_body

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


async def _api_error(request: Request, e: APIError):
    return JSONResponse(error_body(e.message, e.type, e.param), status_code=e.status, headers=e.headers)


async def _http_error(request: Request, e: StarletteHTTPException):
    msg = "request body is not valid UTF-8 JSON" if "parsing the body" in str(e.detail) else str(e.detail)
    return JSONResponse(error_body(msg), status_code=e.status_code, headers=getattr(e, "headers", None))


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


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
