"""``ShedLoad``: a pure-ASGI middleware that refuses a request with 429 when
the queue it would join is full — before its body is read, parsed,
validated or tokenized. Under overload most requests are refused, so a
refusal must cost as little as possible, or refusing eats the CPU the
admitted requests need (measured before this: 128 clients that did not back
off left 6.8 req/s of goodput, a few percent of normal throughput).

Which queue a request joins is decided by method and path alone (the table
below); a request the table does not name passes through. The lanes still
check admission themselves (a queue can fill between this check and the
enqueue), with the same answer.
"""

from __future__ import annotations

import json

from .errors import error_body

# (method, path) -> the lane (or "generate": the completions' gate) it joins
ROUTE_LANES = {
    ("POST", "/v1/embeddings"): "embeddings",
    ("POST", "/v1/classify"): "classify",
    ("POST", "/v1/completions"): "generate",
    ("POST", "/generate"): "generate",
    ("POST", "/v1/search"): "search",
    ("POST", "/v1/documents"): "write",
    ("POST", "/v1/images/search"): "images",
}


class ShedLoad:
    def __init__(self, app, services):
        self.app = app
        self.services = services

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]
            lane = ROUTE_LANES.get((scope["method"], path))
            if lane is not None:
                retry_after = self.services.refuse(lane)
                if retry_after is not None:
                    self.services.metrics.rejected.labels(lane).inc()
                    return await _refuse(send, lane, retry_after)
        return await self.app(scope, receive, send)


async def _refuse(send, lane: str, retry_after: int) -> None:
    body = json.dumps(error_body(429, f"the {lane} queue is full; retry after {retry_after} s")).encode()
    await send({"type": "http.response.start", "status": 429,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", str(retry_after).encode())]})
    await send({"type": "http.response.body", "body": body})
