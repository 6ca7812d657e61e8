"""The FastAPI application: ``create_app(engine=None, config=None)``.

Mount it inside another ASGI app and run its lifespan from the host's, so the
models load at start and the index is flushed at shutdown::

    tallow_app = create_app(engine)
    @contextlib.asynccontextmanager
    async def lifespan(host):
        async with tallow_app.router.lifespan_context(tallow_app):
            yield
    host = FastAPI(lifespan=lifespan)
    host.mount("/ai", tallow_app)

(Without that, loading starts on the first request and ``/ready`` says when
it is done; shutdown flushing is then the host's job: ``await
tallow_app.state.services.close()``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from typing import Any

import orjson

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .. import __version__
from .config import ServeConfig, load_config
from .errors import APIError, install_handlers
from .middleware import BodyLimit, RequestMetrics
from .services import Services

log = logging.getLogger("tallow.serve")


def create_app(engine: Any = None, config: ServeConfig | None = None) -> FastAPI:
    config = (config or load_config()).validate()
    services = Services(config, engine=engine)
    loader: dict[str, asyncio.Task | None] = {"task": None}

    def start_loading() -> None:
        if loader["task"] is None:
            loader["task"] = asyncio.get_running_loop().create_task(asyncio.to_thread(services.load))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        start_loading()
        try:
            yield
        finally:
            task = loader["task"]
            if task is not None and not task.done():
                await asyncio.shield(task)  # loading holds files open: let it finish first
            await services.close()
            log.info("tallow stopped: index and metadata flushed")

    app = FastAPI(title="tallow", version=__version__, lifespan=lifespan,
                  description="CPU-first inference: embeddings, classification, GPT-2 completions, "
                              "semantic search, RAG and image similarity.")
    app.state.services = services
    app.state.start_loading = start_loading
    install_handlers(app)

    from .routes_data import router as data_router
    from .routes_text import router as text_router

    app.include_router(text_router)
    app.include_router(data_router)

    from .playground import mount_playground

    mount_playground(app)  # GET /: the playground page (serve/static/)

    @app.get("/health", tags=["operations"], summary="Liveness: the process answers")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", tags=["operations"], summary="Readiness: models loaded and warmed up")
    async def ready(request: Request):
        start_loading()
        state = services.readiness()
        return JSONResponse(state, status_code=200 if state["ready"] else 503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics")
    async def metrics():
        return Response(services.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_cards() -> list[dict]:
        return [{"id": model_id(services, name), "object": "model", "created": 0, "owned_by": "tallow",
                 "task": name, "path": slot.path}
                for name, slot in services.models.items() if slot.status == "ready"]

    @app.get("/v1/models", tags=["models"], summary="The models this server has loaded (OpenAI format)")
    async def models():
        return {"object": "list", "data": model_cards()}

    @app.get("/v1/models/{model}", tags=["models"], summary="One loaded model (OpenAI format)")
    async def model(model: str):
        for card in model_cards():
            if card["id"] == model:
                return card
        raise APIError(404, f"no loaded model {model!r} (see GET /v1/models)", param="model")

    # Pure ASGI middlewares, outermost last: metrics see every answer, 413s included.
    app.add_middleware(BodyLimit, max_body_bytes=config.server.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=services.metrics)
    return app


class NumpyJSONResponse(JSONResponse):
    """JSON by orjson, numpy arrays included. For embeddings: FastAPI's
    jsonable_encoder + json.dumps took ~8 ms for 32 x 384 floats, this 0.4 ms,
    and float32 values are written in their shortest exact form (9 digits,
    not 17), which round-trip bit for bit."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def model_id(services: Services, name: str) -> str:
    return {"embedder": "tallow-embed", "classifier": "tallow-classify", "generator": "tallow-gpt2",
            "image": "tallow-resnet50"}[name]


# -- helpers the routers share ------------------------------------------------------------

def get_services(request: Request) -> Services:
    request.app.state.start_loading()
    return request.app.state.services


def require_model(services: Services, name: str):
    from .services import MODEL_SETTINGS

    slot = services.models[name]
    if slot.status == "ready":
        return slot.model
    key, flag = MODEL_SETTINGS[name]
    if slot.status == "absent":
        raise APIError(503, f"no {name} model is configured: set {key} = \"PATH\" in tallow.toml "
                            f"(or {flag} PATH) and restart")
    if slot.status == "loading":
        raise APIError(503, f"the {name} model is still loading (see /ready)", headers={"Retry-After": "5"})
    raise APIError(503, f"the {name} model failed to load from {slot.path}: {slot.error}")


def require_engine(services: Services):
    if services.engine_status == "ready" and services.engine is not None:
        return services.engine
    if services.engine_status == "loading":
        raise APIError(503, "the search engine is still starting (see /ready)", headers={"Retry-After": "5"})
    raise APIError(503, f"the search engine failed to open {services.config.data.dir}: {services.engine_error}")


def check_write_key(request: Request) -> None:
    """Bearer API key for write endpoints (when ``server.api_key`` is set)."""
    expected = request.app.state.services.config.server.api_key
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header or scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "this endpoint needs an API key: send 'Authorization: Bearer <key>'",
                       headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise APIError(403, "the API key is not valid for this server")


async def submit(services: Services, lane_name: str, payload: Any, *, size: int = 1, tokens: int = 0,
                 key: Any = None) -> Any:
    """Runs ``payload`` on a lane; admission and timeout failures become HTTP errors."""
    job = enqueue(services, lane_name, payload, size=size, tokens=tokens, key=key)
    return await wait(services, lane_name, job)


def enqueue(services: Services, lane_name: str, payload: Any, *, size: int = 1, tokens: int = 0,
            key: Any = None, stream: bool = False):
    from .batching import LaneClosed, Overloaded

    lane = services.lanes[lane_name]
    try:
        return lane.enqueue(payload, size=size, tokens=tokens, key=key, stream=stream)
    except Overloaded as exc:
        services.metrics.rejected.labels(lane_name).inc()
        raise APIError(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from None
    except LaneClosed as exc:
        raise APIError(503, str(exc)) from None


async def wait(services: Services, lane_name: str, job) -> Any:
    from .batching import LaneTimeout

    try:
        return await services.lanes[lane_name].wait(job, services.config.server.request_timeout_s)
    except LaneTimeout as exc:
        raise APIError(504, f"{exc} (server.request_timeout_s)") from None
