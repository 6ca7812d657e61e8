"""API keys: who may call which route, and how often.

With no key configured every route is open (and ``config`` refuses a bind to
an address other than loopback unless ``server.insecure_no_auth``: protected
mode). With one or more keys, ``AuthGuard`` — a pure ASGI middleware in front
of the router, so it runs before any body is read or parsed — answers every
request by its route's *access level*:

- ``open``: no key needed (``/health``, ``/ready``, the OpenAPI schema and its
  docs pages; ``/metrics`` unless ``server.public_metrics = false``; the
  playground at ``/`` when ``server.public_playground = true``);
- ``read``: any valid key, full or read-only (search, RAG, embeddings,
  classify, completions, generate, image search, the model list; a path no
  route matches, so a 404 says nothing to a caller without a key);
- ``write``: a full key (document and image writes and deletes; a
  WebAssembly function's POST/PUT/PATCH/DELETE routes, which may write its
  KV stores — its GET/HEAD/OPTIONS routes are reads).

No key: **401** with ``WWW-Authenticate: Bearer``; a key that is not valid,
or a read-only key on a write route: **403**. The levels of the built-in
routes are the explicit table ``ROUTE_ACCESS``; function routes (FastAPI
routes whose ``openapi_extra`` has ``x-tallow-function``) are decided by
method; a route with no decision needs a full key (fail closed) and is
logged once, and the test over the app's route table fails until the route
gets a decision here.

The key is read from ``Authorization: Bearer KEY``, ``api-key: KEY`` or
``x-api-key: KEY`` and compared with every configured key in constant time
(SHA-256 of each side, then ``hmac.compare_digest`` against all of them, no
early exit). It is never logged, never echoed in an answer, and the key
headers are removed from the request once checked, so nothing behind
the guard (handlers, function guests) sees it.

Per-key limits (``server.key_rps`` with ``server.key_burst``, a token bucket;
``server.key_max_concurrent``, requests in flight): a key over its budget
gets **429** with ``Retry-After``; other keys are not affected.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import time
from dataclasses import dataclass

from fastapi.routing import APIRoute, iter_route_contexts
from starlette.routing import Match

from .config import ServerConfig
from .errors import error_body

log = logging.getLogger("tallow.serve")

OPEN, READ, WRITE = "open", "read", "write"
METRICS, PLAYGROUND = "metrics", "playground"  # open or read, by setting

# Every built-in route's access level, by (method, path template). A new
# route needs a line here (or is a function route): without one it needs a
# full key, and tests/serve/test_auth.py fails until it has a decision.
ROUTE_ACCESS: dict[tuple[str, str], str] = {
    ("GET", "/health"): OPEN,
    ("GET", "/ready"): OPEN,
    ("GET", "/metrics"): METRICS,
    ("GET", "/openapi.json"): OPEN,
    ("GET", "/docs"): OPEN,
    ("GET", "/docs/assets/{name}"): OPEN,
    ("GET", "/"): PLAYGROUND,
    ("GET", "/playground/{name}"): PLAYGROUND,
    ("GET", "/v1/models"): READ,
    ("GET", "/v1/models/{model}"): READ,
    ("POST", "/v1/embeddings"): READ,
    ("POST", "/v1/classify"): READ,
    ("POST", "/v1/completions"): READ,
    ("POST", "/v1/chat/completions"): READ,
    ("POST", "/generate"): READ,
    ("POST", "/v1/search"): READ,
    ("POST", "/v1/rag"): READ,
    ("POST", "/v1/images/search"): READ,
    ("GET", "/v1/functions"): READ,
    ("GET", "/v1/stats"): READ,
    ("POST", "/v1/documents"): WRITE,
    ("DELETE", "/v1/documents/{id}"): WRITE,
    ("POST", "/v1/images"): WRITE,
}
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
KEY_HEADERS = (b"authorization", b"api-key", b"x-api-key")


def app_routes(app) -> list:
    """Every route of ``app``, those of included routers too, as FastAPI's
    route contexts (the path with any prefix; ``original_route``; ``matches``)."""
    return list(iter_route_contexts(app.routes))


def route_path(route) -> str:
    return getattr(route, "path_format", None) or getattr(route, "path", "") or ""


def is_function_route(route) -> bool:
    return (isinstance(getattr(route, "original_route", route), APIRoute)
            and "x-tallow-function" in (getattr(route, "openapi_extra", None) or {}))


def declared_access(route, method: str) -> str | None:
    """The access level decided for ``method`` on ``route`` (before the
    settings resolve ``metrics``/``playground``), or None: no decision."""
    method = "GET" if method == "HEAD" else method
    level = ROUTE_ACCESS.get((method, route_path(route)))
    if level is None and is_function_route(route):
        level = READ if method in SAFE_METHODS else WRITE
    return level


def resolve(level: str | None, server: ServerConfig) -> str:
    if level == METRICS:
        return OPEN if server.public_metrics else READ
    if level == PLAYGROUND:
        return OPEN if server.public_playground else READ
    return level or WRITE  # no decision: fail closed


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode("latin-1") if isinstance(key, str) else key).digest()


@dataclass(frozen=True)
class Caller:
    role: str  # "full" or "read"
    key_id: str  # "full#0", "read#1": names the key in limits without holding it


class KeySet:
    """The configured keys, held as SHA-256 digests."""

    def __init__(self, full: list[str], read_only: list[str]):
        self._keys = ([(_digest(k), Caller("full", f"full#{i}")) for i, k in enumerate(full)]
                      + [(_digest(k), Caller("read", f"read#{i}")) for i, k in enumerate(read_only)])

    def __bool__(self) -> bool:
        return bool(self._keys)

    def identify(self, presented: bytes) -> Caller | None:
        """The caller a presented key belongs to: compared with every key, in
        constant time per key and with no early exit."""
        d = _digest(presented)
        found = None
        for digest, caller in self._keys:
            ok = hmac.compare_digest(d, digest)
            found = caller if ok else found
        return found


def presented_key(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes] | None:
    """(header name, key) of the first credential found: ``Authorization:
    Bearer KEY``, then ``api-key``, then ``x-api-key``. None without one."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        name = name.lower()
        if name in KEY_HEADERS and name not in found:
            found[name] = value
    auth = found.get(b"authorization")
    if auth is not None:
        scheme, _, token = auth.strip().partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return b"authorization", token.strip()
    for name in (b"api-key", b"x-api-key"):
        if found.get(name, b"").strip():
            return name, found[name].strip()
    return None


class KeyLimits:
    """Per-key token buckets (requests per second, with a burst) and counts of
    requests in flight. Runs on the event loop: no lock needed."""

    def __init__(self, rps: float, burst: int, max_concurrent: int):
        self.rps = rps
        self.burst = float(burst or max(1.0, rps))
        self.max_concurrent = max_concurrent
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, at)
        self.in_flight: dict[str, int] = {}

    def admit(self, key_id: str) -> tuple[str, int] | None:
        """None when the request may run (and it is counted), else (why, Retry-After seconds)."""
        if self.max_concurrent and self.in_flight.get(key_id, 0) >= self.max_concurrent:
            return (f"this API key already has {self.max_concurrent} requests in flight "
                    "(server.key_max_concurrent)", 1)
        if self.rps:
            now = time.monotonic()
            tokens, at = self._buckets.get(key_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rps)
            if tokens < 1.0:
                self._buckets[key_id] = (tokens, now)
                wait = max(1, math.ceil((1.0 - tokens) / self.rps))
                return (f"this API key is over its rate of {self.rps:g} requests per second "
                        "(server.key_rps)", wait)
            self._buckets[key_id] = (tokens - 1.0, now)
        self.in_flight[key_id] = self.in_flight.get(key_id, 0) + 1
        return None

    def release(self, key_id: str) -> None:
        self.in_flight[key_id] -= 1


async def _send_error(send, status: int, message: str, headers: dict[str, str]) -> None:
    body = json.dumps(error_body(status, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class AuthGuard:
    """Pure ASGI middleware: see the module's docstring. ``routes_app`` is the
    FastAPI app whose route table decides (read at each request, so routes
    added after ``create_app`` — function routes — are covered too)."""

    def __init__(self, app, routes_app, server: ServerConfig):
        self.app = app
        self.routes_app = routes_app
        self.server = server
        self.keys = KeySet(server.full_keys(), server.read_only_api_keys)
        self.limits = KeyLimits(server.key_rps, server.key_burst, server.key_max_concurrent)
        self._warned: set[str] = set()

    def route_for(self, scope) -> tuple[object | None, str]:
        """(the route the router will run, the access level for this request)."""
        partial = None
        for route in app_routes(self.routes_app):
            try:
                match, _ = route.matches(scope)
            except Exception:  # a route that cannot match this scope
                continue
            if match == Match.FULL:
                level = declared_access(route, scope["method"])
                if level is None:
                    name = f"{scope['method']} {route_path(route)}"
                    if name not in self._warned:
                        self._warned.add(name)
                        log.warning("route %s has no access decision in tallow.serve.auth.ROUTE_ACCESS: "
                                    "it needs a full API key", name)
                return route, resolve(level, self.server)
            if match == Match.PARTIAL and partial is None:
                partial = route
        return partial, READ  # 404 or 405: says nothing without a key

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or not self.keys:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # none are served: refuse rather than pass unchecked
            await send({"type": "websocket.close", "code": 1008})
            return None
        route, level = self.route_for(scope)
        if level == OPEN:
            return await self.app(scope, receive, send)
        found = presented_key(scope.get("headers") or [])
        if route is not None:
            scope.setdefault("route", getattr(route, "original_route", route))  # the metrics label the refused request with its route
        if found is None:
            hint = (" (or set server.public_playground = true to serve the page itself without one)"
                    if route is not None and declared_access(route, scope["method"]) == PLAYGROUND else "")
            return await _send_error(send, 401, "this server needs an API key: send 'Authorization: Bearer "
                                     "<key>' (or an 'api-key' or 'x-api-key' header)" + hint,
                                     {"WWW-Authenticate": 'Bearer realm="tallow"'})
        _, key = found
        caller = self.keys.identify(key)
        if caller is None:
            return await _send_error(send, 403, "the API key is not valid for this server",
                                     {"WWW-Authenticate": 'Bearer realm="tallow", error="invalid_token"'})
        if level == WRITE and caller.role != "full":
            return await _send_error(send, 403, f"this API key is read-only: {scope['method']} "
                                     f"{route_path(route) if route is not None else scope['path']} needs a full key",
                                     {"WWW-Authenticate": 'Bearer realm="tallow", error="insufficient_scope"'})
        refused = self.limits.admit(caller.key_id)
        if refused is not None:
            why, retry_after = refused
            return await _send_error(send, 429, why, {"Retry-After": str(retry_after)})
        # The key has done its job: nothing behind the guard sees it.
        scope["headers"] = [(n, v) for n, v in scope["headers"] if n.lower() not in KEY_HEADERS]
        try:
            return await self.app(scope, receive, send)
        finally:
            self.limits.release(caller.key_id)
