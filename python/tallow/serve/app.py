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
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .. import __version__
from ..errors import NotFound
from .auth import AuthGuard
from .config import ServeConfig, load_config
from .deps import model_id
from .errors import install_handlers
from .middleware import BodyLimit, RequestMetrics
from .openapi import install_openapi
from .routes_data import router as data_router
from .routes_chat import router as chat_router
from .routes_text import router as text_router
from .services import Services
from .shedding import ShedLoad

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
                              "semantic search, RAG and image similarity.",
                  docs_url=None, redoc_url=None)  # /docs from serve/apidocs.py (no CDN)
    app.state.services = services
    app.state.start_loading = start_loading
    install_handlers(app)

    # Routers: one APIRouter per module, included here; they take what they
    # share from deps.py and never import this module.
    app.include_router(text_router)
    app.include_router(chat_router)
    app.include_router(data_router)

    from .playground import mount_playground

    mount_playground(app)  # GET /: the playground page (serve/static/)
    from .apidocs import mount_docs

    mount_docs(app)  # GET /docs: Swagger UI, its assets served from here

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

    @app.get("/v1/stats", tags=["operations"], summary="Version, native build, engine counts and model states")
    async def stats():
        return await asyncio.to_thread(server_stats, services)

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
        raise NotFound(f"no loaded model {model!r} (see GET /v1/models)", param="model")

    if config.functions:  # WebAssembly functions (tallow.functions), after the built-in routes they must not shadow
        from ..functions.routes import mount_functions
        from .errors import error_response

        mount_functions(app, config.functions, services=services, error_response=error_response,
                        kv_path=Path(getattr(engine, "data_dir", None) or config.data.dir) / "tallow.db",
                        kv_config=config.kv, sync_url=config.data.sync_url, auth_token=config.data.auth_token)

    install_openapi(app, config)

    # Pure ASGI middlewares, outermost last: metrics see every answer, 401s and
    # 413s included; the key is checked before any body is read, and so is
    # whether the request's queue has room (ShedLoad).
    app.add_middleware(BodyLimit, max_body_bytes=config.server.max_body_bytes)
    app.add_middleware(ShedLoad, services=services, hold_ms=config.server.shed_hold_ms)
    app.add_middleware(AuthGuard, routes_app=app, server=config.server)
    app.add_middleware(RequestMetrics, metrics=services.metrics)
    return app


def server_stats(services: Services) -> dict:
    """GET /v1/stats: which tallow answers (version, the native build's ISA
    tiers and the one this CPU runs), what its engine holds and the models'
    states. Engine counts are null until the engine has loaded."""
    from .. import info

    report = info()
    native = report["native"]
    engine = None
    if services.engine is not None and services.engine_status == "ready":
        try:
            engine = services.engine.stats()
        except Exception as exc:  # a closing engine: the rest of the answer still holds
            engine = {"error": str(exc)}
    return {"version": __version__, "torch": report["torch"],
            "native": {key: native.get(key) for key in ("available", "arch", "isa_levels", "best_isa", "isa",
                                                         "threads", "error") if key in native},
            "extras": report["extras"], "engine": engine,
            "models": {name: slot.status for name, slot in services.models.items()}}
