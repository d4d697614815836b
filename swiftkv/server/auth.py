"""ASGI middleware: the API key is checked from the request's headers before anything reads its body, so an
unauthenticated client cannot make the server parse a multi-MB JSON body (FastAPI reads and validates the body
before a route's dependencies run)."""

from __future__ import annotations

import hmac
import json

from swiftkv.server.protocol import error_body

UNAUTHORIZED = "invalid or missing API key (Authorization: Bearer ...)"


def authorized(headers: dict[bytes, bytes] | None, api_key: str | None) -> bool:
    """Whether ``headers`` (ASGI's, lower-case names) carry ``Authorization: Bearer <api_key>`` (always, without a
    key). Compared in constant time."""
    if api_key is None:
        return True
    scheme, _, key = (headers or {}).get(b"authorization", b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), api_key.encode())


class ApiKeyGate:
    """401 for every request without the key, except on ``open_paths`` (``/health``, which then shows no
    counters; the docs where they are enabled)."""

    def __init__(self, app, api_key: str | None, open_paths: frozenset[str] = frozenset()) -> None:
        self.app, self.api_key, self.open_paths = app, api_key, open_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths \
                or authorized(dict(scope.get("headers") or []), self.api_key):
            return await self.app(scope, receive, send)
        body = json.dumps(error_body(UNAUTHORIZED, "authentication_error")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
