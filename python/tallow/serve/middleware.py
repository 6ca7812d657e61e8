"""Two pure-ASGI middlewares (pure ASGI, not BaseHTTPMiddleware, so streamed
responses and client disconnects pass through untouched):

- ``BodyLimit``: refuses a body over ``max_body_bytes`` with 413 — at once from
  Content-Length, or while reading a chunked body — before any handler or
  JSON parser sees it.
- ``RequestMetrics``: counts requests and observes latency per route
  *template* (``/v1/documents/{id}``) and status.
"""

from __future__ import annotations

import json
import time

from .errors import error_body


async def _send_error(send, status: int, message: str, param: str | None = None) -> None:
    body = json.dumps(error_body(status, message, param)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = self.max_body_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_large = f"the request body is larger than the server's limit of {limit} bytes (server.max_body_bytes)"
        if declared is not None:
            try:
                if int(declared) > limit:
                    return await _send_error(send, 413, too_large, "body")
            except ValueError:
                return await _send_error(send, 400, "Content-Length is not a number", "Content-Length")
        # Read the whole body (bounded) first, then replay it to the app.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _send_error(send, 413, too_large, "body")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the real channel (disconnects)

        return await self.app(scope, replay, send)


class RequestMetrics:
    def __init__(self, app, metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            name = getattr(route, "path_format", None) or getattr(route, "path", None) or "unmatched"
            labels = (scope.get("root_path", "") + name, scope["method"], str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - t0)
