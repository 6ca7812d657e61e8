"""The OpenAPI schema says what the server answers: every status each
operation can return (with the one error model), the security scheme and
which operations need a key (as configured), ``/metrics`` as text/plain, the
streaming completions as server-sent events, and the filter syntax the
search endpoints accept.

``ROUTE_ERRORS`` lists the statuses each built-in operation raises itself
(models loading, lanes full, timeouts, not found, unsupported media); the
ones that follow from the settings and the middlewares are added to every
operation they apply to: 413 and 422 for a body, 401/403 for an operation
behind a key, 429 for per-key limits. An operation missing from the table
gets only those (tests/serve/test_openapi.py fails until it has a line).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import WithJsonSchema

from . import auth
from .config import ServerConfig

# Statuses each built-in operation answers besides 200 (and those added by rule).
_MODEL = (422, 429, 503, 504)  # input checks, a lane's queue full, model not ready or lane closing, timeout
ROUTE_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("GET", "/health"): (),
    ("GET", "/ready"): (503,),
    ("GET", "/metrics"): (),
    ("GET", "/v1/models"): (),
    ("GET", "/v1/models/{model}"): (404,),
    ("POST", "/v1/embeddings"): _MODEL,
    ("POST", "/v1/classify"): _MODEL,
    ("POST", "/v1/completions"): _MODEL,
    ("POST", "/generate"): _MODEL,
    ("POST", "/v1/search"): _MODEL,
    ("POST", "/v1/rag"): _MODEL,
    ("POST", "/v1/documents"): _MODEL,
    ("DELETE", "/v1/documents/{id}"): (404, 429, 503, 504),
    ("POST", "/v1/images"): (415,) + _MODEL,
    ("POST", "/v1/images/search"): (415,) + _MODEL,
    ("GET", "/v1/functions"): (),
}

_DESCRIPTIONS = {
    401: "No API key: send `Authorization: Bearer <key>` (or an `api-key` / `x-api-key` header)",
    403: "The API key is not valid, or is read-only and the operation writes",
    404: "Not found",
    413: "The body is larger than server.max_body_bytes",
    415: "The data is not of a media type this server reads",
    422: "The input is invalid (the error names the field in `param`)",
    429: "Too many requests: a lane's queue is full, or the API key is over its budget; retry after Retry-After",
    503: "Not available now: a model or the index is loading, not configured or failed to load",
    504: "The request did not finish within server.request_timeout_s",
}

ERROR_SCHEMA = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                       "code": {"type": "integer"}}}},
}

# tallow's filter syntax (tallow.index.filters), as the server checks it.
_SCALAR = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
_SCALARS = {"type": "array", "minItems": 1, "items": _SCALAR}
_CONDITION = {"type": "object", "minProperties": 1, "additionalProperties": False,
              "properties": {"eq": _SCALAR, "ne": _SCALAR, "in": _SCALARS, "nin": _SCALARS,
                             "gt": {"type": "number"}, "gte": {"type": "number"},
                             "lt": {"type": "number"}, "lte": {"type": "number"}}}
_FILTER_LIST = {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Filter"}}
FILTER_SCHEMA = {
    "title": "Filter",
    "description": 'Payload filter: {"field": value} (equals), {"field": {"gte": 1, "lt": 5}}, '
                   '{"field": {"in": [...]}}, "ne"/"nin" negations, and {"must"|"should"|"must_not": '
                   '[filter, ...]}. Top-level keys are ANDed.',
    "type": "object",
    "propertyNames": {"minLength": 1},
    "properties": {"must": _FILTER_LIST, "should": _FILTER_LIST, "must_not": _FILTER_LIST},
    "additionalProperties": {"anyOf": [_SCALAR, _CONDITION]},
}
# The request models' ``filter`` field: checked by tallow.index.filters, documented
# as above (pydantic cannot name a component it does not define: the marker is
# replaced by the reference when the schema is built).
_FILTER_MARK = "x-tallow-filter"
FilterField = Annotated[dict | None, WithJsonSchema({_FILTER_MARK: True})]
_FILTER_REF = {"anyOf": [{"$ref": "#/components/schemas/Filter"}, {"type": "null"}]}


def _link_filters(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get(_FILTER_MARK):
            return {**{k: v for k, v in node.items() if k != _FILTER_MARK}, **_FILTER_REF}
        return {k: _link_filters(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_link_filters(v) for v in node]
    return node

SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer <key>`"},
    "api-key": {"type": "apiKey", "in": "header", "name": "api-key"},
    "x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key"},
}


def _error_response(status: int) -> dict:
    out: dict[str, Any] = {"description": _DESCRIPTIONS.get(status, "Error"),
                           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if status in (429, 503):
        out["headers"] = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}
    if status == 401:
        out["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return out


def operation_errors(route, method: str, server: ServerConfig) -> set[int]:
    """Every status besides 200 that ``method`` on ``route`` can answer."""
    statuses = set(ROUTE_ERRORS.get((method, auth.route_path(route)), ()))
    if method not in ("GET", "HEAD", "OPTIONS"):
        statuses |= {413}  # BodyLimit, before any handler
    if route.body_field is not None or route.dependant.path_params or route.dependant.query_params:
        statuses |= {422}
    level = auth.resolve(auth.declared_access(route, method), server)
    if server.any_key() and level != auth.OPEN:
        statuses |= {401, 403}
        if server.key_rps or server.key_max_concurrent:
            statuses |= {429}
    return statuses


def build_schema(app, server: ServerConfig) -> dict:
    schema = _link_filters(get_openapi(title=app.title, version=app.version, openapi_version=app.openapi_version,
                                       description=app.description, routes=app.routes))
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    schemas["Filter"] = FILTER_SCHEMA
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    keyed = server.any_key()
    if keyed:
        components["securitySchemes"] = SECURITY_SCHEMES
    for route in auth.app_routes(app):
        if not isinstance(route.original_route, APIRoute) or not route.include_in_schema:
            continue
        for method in route.methods:
            op = schema["paths"].get(route.path_format, {}).get(method.lower())
            if op is None:
                continue
            level = auth.resolve(auth.declared_access(route, method), server)
            op["x-tallow-access"] = level if keyed else auth.OPEN
            if keyed and level != auth.OPEN:
                op["security"] = [{name: []} for name in SECURITY_SCHEMES]
            responses = op.setdefault("responses", {})
            responses.pop("422", None)  # FastAPI's HTTPValidationError: this server answers the error model
            for status in sorted(operation_errors(route, method, server)):
                responses[str(status)] = _error_response(status)
            _special(route, method, responses)
    return schema


def _special(route, method: str, responses: dict) -> None:
    path = auth.route_path(route)
    if path == "/metrics":
        responses["200"] = {"description": "Prometheus text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}}}
    elif path == "/ready":
        ready = {"type": "object", "required": ["ready", "engine", "models"],
                 "properties": {"ready": {"type": "boolean"}, "engine": {"type": "object"},
                                "models": {"type": "object"}}}
        responses["200"] = {"description": "Every configured model is loaded and warmed up",
                            "content": {"application/json": {"schema": ready}}}
        responses["503"] = {"description": "Still loading, or a model or the index failed (the same body)",
                            "content": {"application/json": {"schema": ready}}}
    elif path == "/v1/completions":
        ok = responses.setdefault("200", {"description": "Successful Response"})
        ok.setdefault("content", {"application/json": {"schema": {}}})
        ok["content"]["text/event-stream"] = {"schema": {"type": "string"},
                                              "description": 'with "stream": true: one event per token'}


def install_openapi(app, server: ServerConfig) -> None:
    """``app.openapi()`` builds (once) the schema described above."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app, server)
        return app.openapi_schema

    app.openapi = openapi
