"""One error format for every failure the server answers:

    {"error": {"message": "...", "type": "...", "param": "field or null", "code": 422}}

(the OpenAI shape, so the official client raises its typed errors with our
message). The one place where exceptions become HTTP answers: tallow's own
(``tallow.errors``: InputError -> 422, or 415 for kind "unsupported", 400 for
a chat template's refusal;
NotFound -> 404; Unavailable -> 503), FastAPI's validation errors, Starlette's
HTTP errors and anything unexpected (500, logged, no internals in the body).
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError, NotFound, Unavailable

log = logging.getLogger("tallow.serve")

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
    415: "unsupported_media_type", 422: "invalid_request_error", 429: "rate_limit_error",
    500: "server_error", 503: "service_unavailable", 504: "timeout_error",
}


class APIError(Exception):
    """An error answered to the client as the JSON body above."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _TYPES.get(status, "error")
        self.headers = headers or {}
        self.code = code  # a string code where the OpenAI API has one (model_not_found); else the status


def error_body(status: int, message: str, param: str | None = None, type: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type or _TYPES.get(status, "error"), "param": param,
                      "code": code or status}}


def error_response(status: int, message: str, *, param: str | None = None, type: str | None = None,
                   headers: dict[str, str] | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, type, code), status_code=status, headers=headers)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


# pydantic names the member of a union that failed ("input", "list[str]", 0):
# those tags are types, not fields, and are left out of the field name.
_UNION_TAG = re.compile(r"^(str|int|float|bool|list|dict|tuple|set|none|literal|function-[a-z]+|constrained-[a-z]+)(\[.*\])?$")


def _field(loc: tuple) -> str:
    """("body", "input", 0) -> "input[0]"; the leading "body" is implied."""
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    parts = [p for p in loc if not (isinstance(p, str) and _UNION_TAG.match(p))]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def input_status(exc: InputError) -> int:
    """415 for data of a media type tallow does not read, 400 for a conversation
    the model's chat template refuses (or a model without one: OpenAI's
    status for a request that cannot be served as sent), 422 for any other bad input."""
    from ..engine.chat import ChatTemplateError

    if isinstance(exc, ChatTemplateError):
        return 400
    return 415 if exc.kind == "unsupported" else 422


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, param=exc.param, type=exc.type, headers=exc.headers,
                              code=exc.code)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        return error_response(input_status(exc), str(exc), param=exc.param)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        return error_response(404, str(exc), param=exc.param)

    @app.exception_handler(Unavailable)
    async def _unavailable(request: Request, exc: Unavailable):
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
        return error_response(503, str(exc), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        content_type = request.headers.get("content-type", "")
        if any(tuple(e.get("loc", ())) == ("body",) for e in errors) and not _is_json(content_type):
            # FastAPI reads a JSON body only when the request says it is JSON; otherwise
            # pydantic sees bytes and says "Input should be a valid dictionary".
            got = f"'{content_type}'" if content_type else "none"
            return error_response(415, f"the body must be JSON, sent with 'Content-Type: application/json' "
                                       f"(Content-Type was {got})", param="body")
        if errors and errors[0].get("type") == "json_invalid":
            return error_response(422, f"the body is not valid JSON: {errors[0].get('ctx', {}).get('error', '')}"
                                  .rstrip(": "), param="body")
        by_field: dict[str, list[str]] = {}
        for e in errors:
            msgs = by_field.setdefault(_field(tuple(e.get("loc", ()))), [])
            if e.get("msg", "invalid") not in msgs:
                msgs.append(e.get("msg", "invalid"))
        parts = [f"{name}: {' or '.join(msgs)}" for name, msgs in list(by_field.items())[:5]]
        more = f" (and {len(by_field) - 5} more fields)" if len(by_field) > 5 else ""
        param = _field(tuple(errors[0].get("loc", ()))) if errors else None
        return error_response(422, "; ".join(parts) + more, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":
            # FastAPI's answer when json.loads itself fails (e.g. RecursionError on deep nesting)
            return error_response(422, "the body could not be parsed as JSON (nested too deeply?)", param="body")
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__}); the server logged the details")
