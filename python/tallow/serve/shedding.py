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

Cheap is not enough against clients that ignore ``Retry-After`` and send
again at once: refusals then take all the CPU the model's workers do not,
and on a small machine the workers' share of it shrinks with every busy
loop beside them (measured on 2 cores, 128 such clients: 55 % of the
32-client goodput with refusals answered at once). So a refusal is held
``server.shed_hold_ms`` (250 ms) before it is sent: the decision costs what
it did, the waiting costs a timer, and a keep-alive connection sends nothing
else while it waits — a client that does not back off is slowed to ~4
refusals a second per connection instead of thousands. ``/health`` and every
route the table does not name are never held; 0 turns holding off.
"""

from __future__ import annotations

import asyncio
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
    def __init__(self, app, services, hold_ms: float = 0.0):
        self.app = app
        self.services = services
        self.hold_s = hold_ms / 1000.0

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
                    if self.hold_s:
                        await asyncio.sleep(self.hold_s)
                    return await _refuse(send, lane, retry_after)
        return await self.app(scope, receive, send)


async def _refuse(send, lane: str, retry_after: int) -> None:
    body = json.dumps(error_body(429, f"the {lane} queue is full; retry after {retry_after} s")).encode()
    await send({"type": "http.response.start", "status": 429,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", str(retry_after).encode())]})
    await send({"type": "http.response.body", "body": body})
