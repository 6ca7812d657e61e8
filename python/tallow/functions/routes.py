"""Mounting functions as routes of the FastAPI app (called once by
``tallow.serve.create_app``), and the host API backed by the server's models.

Function routes are ordinary FastAPI routes (``app.add_api_route``), so they
appear in the OpenAPI schema and every app-wide middleware or dependency
(metrics, body limit, authentication) covers them. Calls run in a thread
pool of their own, off the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.routing import Match

from . import abi
from .kv import KV
from .limits import FunctionConfigError, KVConfig
from .manifest import FunctionSpec
from .runtime import FnRequest, FunctionError, Host, HostInputError, HostUnavailable, LoadedFunction, Runtime

log = logging.getLogger("tallow.functions")

MAX_WORKERS = 8     # guest code runs without the GIL; host calls into models queue on their lanes
MAX_IN_FLIGHT = 256  # running + waiting function calls; one more is answered 429
_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade"}


class ServicesHost(Host):
    """Host functions backed by the server's loaded models: embed_text and
    classify_text go through the server's batching lanes (so a function's
    calls are batched with the HTTP API's), preprocess_image runs
    tallow.ops.preprocess in the calling worker thread."""

    def __init__(self, services: Any):
        self.services = services
        self.loop: asyncio.AbstractEventLoop | None = None

    def _model(self, name: str):
        slot = self.services.models[name]
        if slot.status != "ready":
            raise HostUnavailable(f"the {name} model is {slot.status}")
        return slot.model

    def _lane(self, lane_name: str, ids: list, timeout_s: float):
        lane = self.services.lanes[lane_name]
        if self.loop is None:
            raise HostUnavailable("the server's event loop is not known yet")

        async def run():
            job = lane.enqueue(ids, size=len(ids), tokens=sum(len(s) for s in ids))
            return await lane.wait(job, timeout_s)

        fut = asyncio.run_coroutine_threadsafe(run(), self.loop)
        try:
            return fut.result(timeout_s)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError() from None
        except Exception as exc:  # the lanes' Overloaded / LaneClosed / LaneTimeout
            if type(exc).__name__ == "LaneTimeout":
                raise TimeoutError() from None
            raise HostUnavailable(str(exc)) from None

    def _ids(self, model, text: str) -> list:
        try:
            return model.tokenizer.encode_ids([text], truncation=True)
        except ValueError as exc:
            raise HostInputError(str(exc)) from None

    def embed_text(self, text: str, timeout_s: float):
        model = self._model("embedder")
        return self._lane("embeddings", self._ids(model, text), timeout_s)[0]

    def classify_text(self, text: str, timeout_s: float) -> dict:
        model = self._model("classifier")
        row = self._lane("classify", self._ids(model, text), timeout_s)[0]
        return {"label": row["label"], "score": row["score"], "probabilities": row.get("probabilities", {})}

    def preprocess_image(self, data: bytes, timeout_s: float):
        import numpy as np

        from ..ops.preprocess import preprocess

        try:
            mp = self.services.config.images.max_megapixels
            return np.ascontiguousarray(preprocess([bytes(data)], num_threads=1, max_megapixels=mp)[0].numpy(),
                                        dtype="<f4")
        except ValueError as exc:
            raise HostInputError(str(exc)) from None


def _clashes(app: FastAPI, spec: FunctionSpec) -> str | None:
    if spec.base_route == "/v1/functions" or (spec.wildcard and "/v1/functions".startswith(spec.base_route.rstrip("/") + "/")):
        return "GET /v1/functions"
    probes = [spec.base_route] + ([spec.base_route.rstrip("/") + "/x"] if spec.wildcard else [])
    for route in app.routes:
        for path in probes:
            for method in spec.methods:
                scope = {"type": "http", "path": path, "method": method, "root_path": ""}
                try:
                    match, _ = route.matches(scope)
                except Exception:
                    continue
                if match == Match.FULL:
                    return f"{method} {getattr(route, 'path', path)}"
    return None


# The rest of the path below a "/..." route: Starlette's {path:path} takes
# slashes, which an OpenAPI path parameter cannot hold as such (a client sends
# them percent-encoded, %2F; the function sees them decoded), and may be empty.
_SUBPATH = {"name": "path", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "the rest of the path below the function's route (may be empty; slashes are "
                           "sent as %2F and reach the function decoded)"}
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT")


def _openapi_extra(fn: LoadedFunction, method: str, subpath: bool) -> dict:
    """The operation's OpenAPI fields FastAPI cannot infer from the handler
    (which reads the raw request); its responses are described by
    tallow.serve.openapi, which knows this is a function by x-tallow-function."""
    extra: dict[str, Any] = {"x-tallow-function": {"name": fn.spec.name, "abi": abi.ABI_VERSION,
                                                   "module": fn.spec.module.name, "sha256": fn.sha256}}
    if method not in ("GET", "HEAD"):
        extra["requestBody"] = {"required": False,
                                "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}}
    if subpath:
        extra["parameters"] = [_SUBPATH]
    return extra


def mount_functions(app: FastAPI, specs: list[FunctionSpec], *, services: Any = None,
                    error_response: Callable[..., Response], kv_path: str | Path | None = None,
                    kv_config: KVConfig | None = None, sync_url: str = "", auth_token: str = "",
                    cache_dir: str | Path | None = None) -> Runtime:
    """Compiles (or loads from the cache) every function, checks its module
    and its routes against the app's, and adds the routes and
    ``GET /v1/functions``. Raises FunctionConfigError naming the entry."""
    kv = KV(kv_path, kv_config, sync_url=sync_url, auth_token=auth_token)
    host = ServicesHost(services) if services is not None else Host()
    runtime = Runtime(kv=kv, host=host, cache_dir=cache_dir)
    for spec in specs:
        clash = _clashes(app, spec)
        if clash:
            raise FunctionConfigError(f"function {spec.name!r}: route {spec.route!r} clashes with the built-in "
                                      f"route {clash}")
    loaded = [runtime.load(spec) for spec in specs]
    if any(spec.kv_stores for spec in specs) and kv_path is not None:
        kv.store  # open (and migrate) the metadata store now, not in a first request
    pool = concurrent.futures.ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="tallow-fn")
    state = {"in_flight": 0}
    app.state.functions = runtime

    def make_handler(fn: LoadedFunction):
        name, lim = fn.spec.name, fn.spec.limits

        async def handler(request: Request) -> Response:
            if isinstance(host, ServicesHost) and host.loop is None:
                host.loop = asyncio.get_running_loop()
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > lim.max_body_bytes:
                return error_response(413, f"the request body is larger than function {name!r} accepts "
                                      f"({lim.max_body_bytes} bytes, limits.max_body_bytes)")
            body = await request.body()
            if len(body) > lim.max_body_bytes:
                return error_response(413, f"the request body is larger than function {name!r} accepts "
                                      f"({lim.max_body_bytes} bytes, limits.max_body_bytes)")
            if state["in_flight"] >= MAX_IN_FLIGHT:
                return error_response(429, f"too many function calls in flight ({MAX_IN_FLIGHT})",
                                      headers={"Retry-After": "1"})
            req = FnRequest(request.method, request.url.path, request.url.query,
                            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw], body)
            state["in_flight"] += 1
            try:
                out = await asyncio.wrap_future(pool.submit(runtime.call, name, req))
            except FunctionError as exc:
                return error_response(exc.status, exc.message, param=None)
            finally:
                state["in_flight"] -= 1
            resp = Response(content=out.body, status_code=out.status)
            resp.raw_headers.extend((k.lower().encode("latin-1"), v.encode("latin-1"))
                                    for k, v in out.headers if k.lower() not in _HOP_BY_HOP)
            return resp

        handler.__name__ = f"function_{name}"
        return handler

    def make_not_allowed(spec: FunctionSpec, served: set[str]):
        allow = ", ".join(sorted(served))

        async def not_allowed(request: Request) -> Response:
            return error_response(405, f"function {spec.name!r} answers {allow} on {spec.route}",
                                  headers={"Allow": allow})

        return not_allowed

    not_allowed: list[tuple[LoadedFunction, str, str, int]] = []
    for fn in loaded:
        spec = fn.spec
        summary = f"WebAssembly function {spec.name!r} ({abi.ABI_VERSION})"
        description = (spec.description + "\n\n" if spec.description else "") + \
            f"Module `{spec.module.name}` (sha256 {fn.sha256[:16]}…). Limits: deadline {spec.limits.deadline_ms:g} ms, " \
            f"memory {spec.limits.memory_mib} MiB, fuel {spec.limits.fuel}. A trap answers 500, the deadline 504."
        handler = make_handler(fn)
        paths = [spec.base_route] + ([spec.base_route.rstrip("/") + "/{path:path}"] if spec.wildcard else [])
        for i, path in enumerate(paths):
            name = f"function_{spec.name}" + ("_subpaths" if i else "")
            for method in spec.methods:  # one route per method: each gets its own OpenAPI operation id
                app.add_api_route(path, handler, methods=[method], tags=["functions"], summary=summary,
                                  description=description, response_class=Response, name=name,
                                  operation_id=f"{name}_{method.lower()}",
                                  openapi_extra=_openapi_extra(fn, method, bool(i)))
            not_allowed.append((fn, path, name, i))
        log.info("function %s mounted at %s %s (%s, %.1f ms)", spec.name, ",".join(spec.methods), spec.route,
                 "from the compiled cache" if fn.from_cache else "compiled", fn.load_ms)

    # Any other method on a function's path: 405 naming every method it serves
    # (with one route per method, Starlette's own 405 names only the first
    # route's). After every function's routes, so none shadows another's.
    for fn, path, name, i in not_allowed:
        served = set(fn.spec.methods) | ({"HEAD"} if "GET" in fn.spec.methods else set())
        others = [m for m in HTTP_METHODS if m not in served]
        if others:
            # Out of the schema; its openapi_extra marks it a function route for auth (is_function_route).
            app.add_api_route(path, make_not_allowed(fn.spec, served), methods=others, include_in_schema=False,
                              name=name + "_other_methods", response_class=Response,
                              openapi_extra=_openapi_extra(fn, "GET", bool(i)))

    @app.get("/v1/functions", tags=["functions"], summary="The WebAssembly functions this server serves")
    async def list_functions():
        return {"object": "list", "abi": abi.ABI_VERSION,
                "data": [runtime.functions[fn.spec.name].describe() for fn in loaded]}

    return runtime
