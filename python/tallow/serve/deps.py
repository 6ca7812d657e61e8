"""What every router shares: the ``Services`` of the app, the model and engine
guards (503 while loading / absent / failed), running a
payload on a lane (submit / enqueue / wait, with admission and timeout
failures as HTTP errors), the numpy-aware JSON response and public model ids.

Routers import from here (and from ``rules``, ``services``, ``errors``), never
from ``app``: ``app`` imports the routers, so the dependency runs one way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse

from ..errors import Unavailable
from .admission import admit, too_busy  # noqa: F401 (admit: the routers import it from here)
from .batching import LaneClosed, LaneTimeout, Overloaded
from .errors import APIError
from .services import MODEL_SETTINGS, Services

MODEL_IDS = {"embedder": "tallow-embed", "classifier": "tallow-classify", "generator": "tallow-gpt2",
             "image": "tallow-resnet50"}
# The generator's id before it named its model: still accepted in requests while it is a GPT-2.
LEGACY_GENERATOR_ID = MODEL_IDS["generator"]


class NumpyJSONResponse(JSONResponse):
    """JSON by orjson, numpy arrays included. For embeddings: FastAPI's
    jsonable_encoder + json.dumps took ~8 ms for 32 x 384 floats, this 0.4 ms,
    and float32 values are written in their shortest exact form (9 digits,
    not 17), which round-trip bit for bit."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def model_id(services: Services, name: str) -> str:
    """The public id of a model slot (what /v1/models lists and responses name).
    The generator's names the model it serves, since which one answers is what
    a client of a chat API wants to know (``generator_id``); the others keep
    their task names."""
    if name == "generator":
        return generator_id(services.models[name].path) or MODEL_IDS[name]
    return MODEL_IDS[name]


def generator_id(path: str) -> str:
    """The generator's public id from its configured location: a built-in
    ``tallow:NAME`` is NAME (``smollm2-135m-instruct``), a local directory or
    GGUF file its name without the ``.gguf`` suffix, a Hub id itself
    (``openai-community/gpt2``, as vLLM names a model). "" when none is set."""
    if not path:
        return ""
    if path.startswith("tallow:"):
        return path[len("tallow:"):]
    p = Path(path).expanduser()
    if p.exists():
        return p.stem if p.is_file() and p.suffix.lower() == ".gguf" else p.resolve().name
    return path


def check_model_name(services: Services, slot: str, requested: str | None) -> None:
    """The ``model`` field of an OpenAI-style request: omitted (null), the id
    GET /v1/models lists for this slot, or the model's configured path or Hub
    id. Anything else is refused as the OpenAI API refuses it (404,
    ``model_not_found``): a client that names a model must not silently get
    another one."""
    if requested is None:
        return
    configured = services.models[slot].path
    if requested == model_id(services, slot) or (configured and requested == configured):
        return
    if slot == "generator" and requested == LEGACY_GENERATOR_ID and _is_gpt2(services):
        return  # what clients written before the generator named its model send
    known = ", ".join(repr(n) for n in (model_id(services, slot), configured) if n)
    raise APIError(404, f"the model {requested!r} does not exist here: this route serves {known} "
                        f"(or omit 'model'; GET /v1/models lists them)", param="model",
                   type="invalid_request_error", code="model_not_found")


def _is_gpt2(services: Services) -> bool:
    model = services.models["generator"].model
    return getattr(model, "architecture", None) == "gpt2"


def get_services(request: Request) -> Services:
    """The app's services; starts loading them when the host did not run the lifespan."""
    request.app.state.start_loading()
    return request.app.state.services


def require_model(services: Services, name: str):
    """The loaded model of slot ``name``, or ``Unavailable`` (503) saying why not."""
    slot = services.models[name]
    if slot.status == "ready":
        return slot.model
    key, flag = MODEL_SETTINGS[name]
    if slot.status == "absent" and slot.error:  # a built-in model whose package is missing
        raise Unavailable(f"no {name} model: {slot.error}; or set {key} = \"PATH\" in tallow.toml "
                          f"(or {flag} PATH) and restart")
    if slot.status == "absent":
        raise Unavailable(f"no {name} model is configured: set {key} = \"PATH\" in tallow.toml "
                          f"(or {flag} PATH) and restart")
    if slot.status == "loading":
        raise Unavailable(f"the {name} model is still loading (see /ready)", retry_after_s=5)
    if slot.status == "restarting":
        raise Unavailable(f"the {name} worker is restarting: {slot.error} (see /ready)", retry_after_s=5)
    raise Unavailable(f"the {name} model failed to load from {slot.path}: {slot.error}")


def require_engine(services: Services):
    """The open search engine, or ``Unavailable`` (503) saying why not."""
    if services.engine_status == "ready" and services.engine is not None:
        return services.engine
    if services.engine_status == "loading":
        raise Unavailable("the search engine is still starting (see /ready)", retry_after_s=5)
    raise Unavailable(f"the search engine failed to open {services.config.data.dir}: {services.engine_error}")


async def submit(services: Services, lane_name: str, payload: Any, *, size: int = 1, tokens: int = 0,
                 key: Any = None) -> Any:
    """Runs ``payload`` on a lane and returns its result. Admission and timeout
    failures become HTTP errors; an exception of the job itself is raised as
    it is (tallow's errors are answered by ``errors.install_handlers``)."""
    job = enqueue(services, lane_name, payload, size=size, tokens=tokens, key=key)
    return await wait(services, lane_name, job)


def enqueue(services: Services, lane_name: str, payload: Any, *, size: int = 1, tokens: int = 0,
            key: Any = None, stream: bool = False):
    """Admits a job to a lane (429 when its queue is full, 503 when it is closing)."""
    lane = services.lanes[lane_name]
    try:
        return lane.enqueue(payload, size=size, tokens=tokens, key=key, stream=stream)
    except Overloaded as exc:
        raise too_busy(services, exc) from None
    except LaneClosed as exc:
        raise APIError(503, str(exc)) from None


async def wait(services: Services, lane_name: str, job) -> Any:
    """The result of an enqueued job (504 past ``server.request_timeout_s``)."""
    try:
        return await services.lanes[lane_name].wait(job, services.config.server.request_timeout_s)
    except LaneTimeout as exc:
        raise APIError(504, f"{exc} (server.request_timeout_s)") from None
