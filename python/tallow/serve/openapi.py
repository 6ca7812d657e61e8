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
from pydantic import BeforeValidator, Field, WithJsonSchema

from . import auth
from .config import ServeConfig, ServerConfig

# Statuses each built-in operation answers besides 200 (and those added by rule).
_MODEL = (422, 429, 503, 504)  # input checks, a lane's queue full, model not ready or lane closing, timeout
_OPENAI = (404,) + _MODEL  # and a `model` this server does not serve: 404 model_not_found (deps.check_model_name)
ROUTE_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("GET", "/health"): (),
    ("GET", "/ready"): (503,),
    ("GET", "/metrics"): (),
    ("GET", "/v1/models"): (),
    ("GET", "/v1/models/{model}"): (404,),
    ("POST", "/v1/embeddings"): _OPENAI,
    ("POST", "/v1/classify"): _OPENAI,
    ("POST", "/v1/completions"): _OPENAI,
    ("POST", "/v1/chat/completions"): (400,) + _OPENAI,  # 400: the chat template refused or is missing
    ("POST", "/generate"): _MODEL,
    ("POST", "/v1/search"): _MODEL,
    ("POST", "/v1/rag"): _MODEL,
    ("POST", "/v1/documents"): _MODEL,
    ("DELETE", "/v1/documents/{id}"): (404, 429, 503, 504),
    ("POST", "/v1/images"): (415,) + _MODEL,
    ("POST", "/v1/images/search"): (415,) + _MODEL,
    ("GET", "/v1/functions"): (),
    ("GET", "/v1/stats"): (),
}

_DESCRIPTIONS = {
    401: "No API key: send `Authorization: Bearer <key>` (or an `api-key` / `x-api-key` header)",
    403: "The API key is not valid, or is read-only and the operation writes",
    404: "Not found (an unknown `model`: code `model_not_found`, as the OpenAI API answers)",
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
                       "code": {"anyOf": [{"type": "integer"}, {"type": "string"}],
                                "description": "the HTTP status, or a string code where the OpenAI API has "
                                               "one (model_not_found)"}}}},
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

# Request field types whose JSON Schema says what the server accepts. The request
# models are strict (no "1" for 1, no 0 for false: what JSON Schema refuses, the
# server refuses); an integer field takes an integral float (JSON Schema's
# integer includes 1.0).
def _integral(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[int, BeforeValidator(_integral)]


def bounded_int(**bounds: int) -> Any:
    """``Int`` within bounds (in a union, pydantic writes bounds given beside the
    validator as raw "ge"/"lt" keys that JSON Schema does not read)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


# Seeds within +-(2**53 - 1): integers a JSON number holds exactly (clients and
# validators that read numbers as doubles agree on the bound).
Seed = bounded_int(ge=-(2**53 - 1), le=2**53 - 1)
# Text the server reads (a query, an input, a prompt): not empty, not only whitespace.
Text = Annotated[str, Field(json_schema_extra={"minLength": 1, "pattern": r"\S"})]
NonEmpty = Annotated[str, Field(min_length=1)]
DOCUMENT_SCHEMA = {
    "type": "object", "required": ["text"], "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "minLength": 1, "description": "default: sha256 of the text"},
        "text": {"type": "string", "minLength": 1, "pattern": r"\S"},
        "title": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "category": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "timestamp": {"anyOf": [{"type": "integer"}, {"type": "null"}], "description": "Unix seconds"},
        "payload": {"anyOf": [{"type": "object", "propertyNames": {"not": {"enum": ["_tallow_hash", "_tallow_id"]}}},
                              {"type": "null"}]},
    },
}

SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer <key>`"},
    "api-key": {"type": "apiKey", "in": "header", "name": "api-key"},
    "x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key"},
}


# A WebAssembly function's operation (tallow.functions): its answers are the
# function's own (any 2xx with any body; any other status, which the example
# functions answer in the error model), besides those tallow answers for it.
FUNCTION_ERRORS = (429, 500, 504)
_FUNCTION_DESCRIPTIONS = {
    413: "The body is larger than server.max_body_bytes or the function's limits.max_body_bytes",
    429: "Too many function calls in flight; retry after Retry-After",
    500: "The function trapped, could not be instantiated, or its handle() returned non-zero",
    504: "The function ran past its limits.deadline_ms or out of limits.fuel",
}


def _function_responses(responses: dict) -> None:
    responses.pop("200", None)  # FastAPI's "Successful Response"
    responses["2XX"] = {"description": "The function's answer: its status, headers and body are its own",
                        "content": {"*/*": {"schema": {}}}}
    for status, text in _FUNCTION_DESCRIPTIONS.items():
        if str(status) in responses:
            responses[str(status)]["description"] = text
    responses["default"] = {
        "description": "Any other status the function answers itself (as a REST API answers 404, 405 or 422); "
                       "tallow's example functions answer them in the error model",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


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
    if auth.is_function_route(route):
        statuses |= set(FUNCTION_ERRORS)
    if method not in ("GET", "HEAD", "OPTIONS"):
        statuses |= {413}  # BodyLimit, before any handler
    if route.body_field is not None or route.dependant.path_params or route.dependant.query_params:
        statuses |= {422}
    if route.body_field is not None:
        statuses |= {415}  # a body not declared as JSON (errors.py), or of a media type not read
    level = auth.resolve(auth.declared_access(route, method), server)
    if server.any_key() and level != auth.OPEN:
        statuses |= {401, 403}
        if server.key_rps or server.key_max_concurrent:
            statuses |= {429}
    return statuses


def _limits(schemas: dict, config: ServeConfig, dim: int | None) -> None:
    """The configured limits, where a request schema can say them."""
    m = config.models

    def prop(model: str, name: str) -> dict:
        return schemas.get(model, {}).get("properties", {}).get(name, {})

    def list_branch(p: dict) -> dict:
        return next((b for b in p.get("anyOf", []) if b.get("type") == "array"), {})

    for model in ("CompletionRequest", "GenerateRequest", "RagBody"):
        if prop(model, "max_tokens"):
            prop(model, "max_tokens")["maximum"] = m.max_completion_tokens
    if prop("CompletionRequest", "n"):
        prop("CompletionRequest", "n")["maximum"] = m.max_n
        list_branch(prop("CompletionRequest", "prompt")).update(minItems=1, maxItems=m.max_completion_rows)
    for model in ("EmbeddingsRequest", "ClassifyRequest"):
        branch = list_branch(prop(model, "input"))
        if branch:
            branch.update(minItems=1, maxItems=m.max_inputs_per_request)
    if prop("DocumentsBody", "documents"):
        docs = prop("DocumentsBody", "documents")
        docs["maxItems"] = m.max_inputs_per_request
        docs["description"] = (
            f"{docs.get('description', '')}. At most {m.max_inputs_per_request} documents "
            f"(models.max_inputs_per_request), each text at most {config.data.max_document_chars} characters "
            f"(data.max_document_chars), in a body of at most {config.server.max_body_bytes} bytes "
            "(server.max_body_bytes, else 413). A document repeated exactly is stored once; two different "
            "documents with one id (given, or the text's sha256) are refused.").lstrip(". ")
        docs["items"]["properties"]["text"]["maxLength"] = config.data.max_document_chars
    if dim is not None and prop("EmbeddingsRequest", "dimensions"):
        prop("EmbeddingsRequest", "dimensions")["anyOf"] = [{"const": dim}, {"type": "null"}]


def build_schema(app, config: ServeConfig, dim: int | None = None) -> dict:
    server = config.server
    schema = _link_filters(get_openapi(title=app.title, version=app.version, openapi_version=app.openapi_version,
                                       description=app.description, routes=app.routes))
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    _limits(schemas, config, dim)
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
            if auth.is_function_route(route):
                _function_responses(responses)
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
    elif path in ("/v1/completions", "/v1/chat/completions"):
        ok = responses.setdefault("200", {"description": "Successful Response"})
        ok.setdefault("content", {"application/json": {"schema": {}}})
        # with "stream": true: server-sent events, one per token, then "data: [DONE]"
        ok["content"]["text/event-stream"] = {}


def install_openapi(app, config: ServeConfig) -> None:
    """``app.openapi()`` builds the schema described above (kept once the
    embedder has loaded: the schema names its dimension)."""

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        slot = app.state.services.models.get("embedder")
        dim = slot.model.config.hidden_size if slot is not None and slot.status == "ready" else None
        schema = build_schema(app, config, dim)
        if dim is not None:
            app.openapi_schema = schema
        return schema

    app.openapi = openapi
