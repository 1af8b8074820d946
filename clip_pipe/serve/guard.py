"""ASGI middleware checked before a request body is read: bearer token and body size, per route.

Imports no FastAPI. A body over its route's limit is refused from its Content-Length at once, and a
chunked body (no length) is counted as it streams in: the handler's read raises `BodyTooLarge`.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable


class BodyTooLarge(Exception):
    pass


# Routes that OpenAI clients call: their errors take OpenAI's shape, whose message those clients show.
OPENAI_ROUTES = ("/v1/embeddings", "/v1/models")
OPENAI_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error"}


def error_body(path: str, status: int, code: str, detail: str) -> dict:
    """`{"error": code, "detail": message}`, or on OpenAI's routes OpenAI's `{"error": {"message", ...}}`."""
    if path in OPENAI_ROUTES:
        kind = OPENAI_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        return {"error": {"message": detail, "type": kind, "code": code, "param": None}}
    return {"error": code, "detail": detail}


async def send_error(scope, send, status: int, code: str, detail: str, headers: dict | None = None) -> None:
    """The API's JSON error, written as raw ASGI messages."""
    body = json.dumps(error_body(scope["path"], status, code, detail)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Bearer token (if set) and request size for every /v1/ route.

    `max_body_bytes(path, content_type)`: the largest body that route accepts with that content type.
    """

    def __init__(self, app, token: str | None, max_body_bytes: Callable[[str, bytes], int]):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.token = token.encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token is not None:
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            # Constant-time comparison, so the response time says nothing about how much of a guess was right.
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
                detail = "missing bearer token" if not given else "wrong bearer token"
                return await send_error(
                    scope, send, 401, "unauthorized", detail, {"WWW-Authenticate": "Bearer"}
                )
        max_bytes = self.max_body_bytes(scope["path"], headers.get(b"content-type", b""))
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            detail = f"request body is {int(declared)} bytes, over the limit of {max_bytes}"
            return await send_error(scope, send, 413, "request_too_large", detail)

        num_bytes = 0

        async def counting_receive():  # a chunked body declares no length: count as it arrives
            nonlocal num_bytes
            message = await receive()
            num_bytes += len(message.get("body", b""))
            if num_bytes > max_bytes:
                raise BodyTooLarge
            return message

        return await self.app(scope, counting_receive, send)
