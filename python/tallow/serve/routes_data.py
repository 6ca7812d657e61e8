"""Data endpoints: /v1/search, /v1/rag, /v1/documents (ingest, delete) and
/v1/images (store, similarity search)."""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..errors import InputError, NotFound, Unavailable
from . import rules
from .openapi import DOCUMENT_SCHEMA, FilterField, Int, Seed, Text

from .deps import admit, get_services, require_engine, require_model, submit
from .errors import APIError
from .generation import GenerationTimeout

router = APIRouter()


# -- search and RAG ----------------------------------------------------------------------------

class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    query: Text = Field(min_length=1)
    k: Int = Field(10, ge=1, le=1000)
    filter: FilterField = None
    score_threshold: float | None = None
    hybrid: bool = False


@router.post("/v1/search", tags=["search"], summary="Semantic (or hybrid BM25 + vector) search")
async def search(body: SearchRequest, request: Request):
    services = get_services(request)
    engine = require_engine(services)
    t0 = time.perf_counter()
    hits = await submit(services, "search", lambda: engine.search(body.query, body.k, filter=body.filter,
                                                                 score_threshold=body.score_threshold,
                                                                 hybrid=body.hybrid))
    return {"object": "list", "hits": [h.to_dict() for h in hits],
            "took_ms": round((time.perf_counter() - t0) * 1000, 3)}


class RagBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    question: Text = Field(min_length=1)
    k: Int = Field(4, ge=1, le=50)
    max_tokens: Int = Field(64, ge=1)
    filter: FilterField = None
    hybrid: bool = False
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Seed | None = None
    include_prompt: bool = False


@router.post("/v1/rag", tags=["search"], summary="Retrieval-augmented answer with its sources")
async def rag(body: RagBody, request: Request):
    """With a generator configured: GPT-2 answers from the retrieved chunks
    (``"mode": "generative"``). Without one: the retrieved sentences closest
    to the question (``"mode": "extractive"``), on the search lane."""
    services = get_services(request)
    engine = require_engine(services)
    rules.check_rag(body.max_tokens, services.config.models)
    t0 = time.perf_counter()
    if services.models["generator"].status == "absent":
        answer = await submit(services, "search", lambda: engine.rag(
            body.question, body.k, max_new_tokens=body.max_tokens, filter=body.filter, hybrid=body.hybrid,
            mode="extractive"), key=rules.unique_key("rag"))
    else:
        require_model(services, "generator")  # loading or failed: 503 saying why
        # Retrieval in a thread; the answer's rows join the generator's running batch.
        admit(services, services.generation_slots)
        try:
            answer = await run_in_threadpool(
                engine.rag, body.question, body.k, max_new_tokens=body.max_tokens, filter=body.filter,
                hybrid=body.hybrid, temperature=body.temperature, top_p=body.top_p, seed=body.seed)
        except GenerationTimeout as exc:  # its rows were cancelled in the worker
            raise APIError(504, str(exc)) from None
        finally:
            services.generation_slots.leave()
    out = answer.to_dict()
    if not body.include_prompt:
        out.pop("prompt", None)
    out["took_ms"] = round((time.perf_counter() - t0) * 1000, 3)
    return out


# -- documents ---------------------------------------------------------------------------------

class DocumentsBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    documents: list[dict] = Field(min_length=1, description="{id, text, title?, category?, timestamp?, payload?}",
                                  json_schema_extra={"items": DOCUMENT_SCHEMA})


@router.post("/v1/documents", tags=["documents"], summary="Ingest documents (chunk, embed, index)")
async def ingest(body: DocumentsBody, request: Request):
    services = get_services(request)
    engine = require_engine(services)
    documents = rules.check_documents(body.documents, services.config.models.max_inputs_per_request,
                                      services.config.data.max_document_chars)

    # The engine serialises its writes itself (its DerivedIndex's lock): the
    # write lane needs no max_concurrency of 1 for correctness.
    summary = await submit(services, "write", lambda: engine.ingest(documents, progress=False))
    return {"object": "ingest", **summary.to_dict()}


@router.delete("/v1/documents/{id:path}", tags=["documents"], summary="Delete a document and its chunks")
async def delete_document(id: str, request: Request):
    services = get_services(request)
    engine = require_engine(services)

    if not await submit(services, "write", lambda: engine.delete_document(id)):
        raise NotFound(f"no document with id {id!r}", param="id")
    return {"id": id, "object": "document", "deleted": True}


# -- images ------------------------------------------------------------------------------------

# What base64.b64decode(validate=True) takes, not empty
_BASE64 = {"minLength": 4, "pattern": "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"}


class ImageBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]*$", description="no control characters")
    image: str = Field(description="the encoded image (JPEG, PNG, ...) as base64", json_schema_extra=_BASE64)
    payload: dict = Field(default_factory=dict)


class ImageSearchBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    image: str = Field(description="the encoded image as base64", json_schema_extra=_BASE64)
    k: Int = Field(10, ge=1, le=1000)
    filter: FilterField = None
    score_threshold: float | None = None


# Form fields hold text: numbers as JSON writes them (no "nan", "1_0" or " 5")
_JSON_INT = re.compile(r"-?(?:0|[1-9][0-9]*)\Z")
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z")


async def _image_fields(request: Request) -> dict:
    """The fields of a JSON body (image as base64) or a multipart form (image as
    a file part, payload/filter as JSON strings), with the image as bytes."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        try:
            form = await request.form()
        except Exception as exc:
            raise InputError(f"the multipart body could not be read: {exc}", param="body") from None
        fields: dict[str, Any] = {}
        try:  # uploaded files are spooled to temporary files: close them
            for key, value in form.multi_items():
                if key in fields:
                    raise InputError(f"the form gives {key} more than once", param=key)
                if key == "image":
                    if not hasattr(value, "read"):
                        raise InputError("image must be a file part", param="image")
                    fields["image"] = await value.read()
                elif key in ("payload", "filter"):
                    try:
                        fields[key] = json.loads(value)
                    except (TypeError, ValueError):
                        raise InputError(f"{key} must be a JSON object", param=key) from None
                elif key in ("k",):
                    if not isinstance(value, str) or not _JSON_INT.match(value):
                        raise InputError("k must be an integer", param="k")
                    fields[key] = int(value)
                elif key == "score_threshold":
                    if value == "null":
                        fields[key] = None
                    elif isinstance(value, str) and _JSON_NUMBER.match(value):
                        fields[key] = float(value)
                    else:
                        raise InputError("score_threshold must be a number", param=key)
                else:
                    fields[key] = value
        finally:
            await form.close()
        if "image" not in fields:
            raise InputError("the form has no 'image' file part", param="image")
        return fields
    if ctype and not ctype.startswith("application/json"):
        raise InputError(f"send application/json (image as base64) or multipart/form-data, not {ctype!r}",
                         param="body", kind="unsupported")
    try:
        fields = json.loads(await request.body())
    except ValueError as exc:
        raise InputError(f"the body is not valid JSON: {exc}", param="body") from None
    except RecursionError:  # json's C scanner recurses per nesting level
        raise InputError("the body's JSON is nested too deeply", param="body") from None
    if not isinstance(fields, dict):
        raise InputError("the body must be a JSON object", param="body")
    return fields


def _decode_image(fields: dict, model_cls) -> tuple[Any, bytes]:
    """Validates the non-image fields with ``model_cls`` and returns (fields, image bytes)."""
    from pydantic import ValidationError

    raw = fields.get("image")
    checked = {**fields, "image": "-"} if isinstance(raw, (bytes, bytearray)) else fields
    try:
        parsed = model_cls.model_validate(checked)
    except ValidationError as exc:
        e = exc.errors()[0]
        name = ".".join(str(p) for p in e.get("loc", ())) or "body"
        raise InputError(f"{name}: {e.get('msg')}", param=name) from None
    if isinstance(raw, (bytes, bytearray)):
        data = bytes(raw)
    else:
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("image is not valid base64", param="image") from None
    if not data:
        raise InputError("image is empty: no bytes to read as an image", param="image", kind="unsupported")
    return parsed, data


def _require_images(services):
    require_engine(services)
    require_model(services, "image")
    if services.images is None:
        raise Unavailable("image search is not available (see /ready)")
    return services.images


def _image_body_doc(model_cls) -> dict:
    """OpenAPI requestBody for the image endpoints (they read the body by hand
    to take either JSON with base64 or a multipart upload)."""
    schema = model_cls.model_json_schema()
    # The file part: no bound beside its format (an empty file is 415, as any bytes
    # that are not an image are). A fuzzer that cannot read binaries checks a form
    # with "" for it: a minLength made every form look invalid to schemathesis.
    form = {**schema, "properties": {**schema["properties"], "image": {"type": "string", "format": "binary"}}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                          "multipart/form-data": {"schema": form}}}}


@router.post("/v1/images", tags=["images"], summary="Store an image with metadata (features indexed)",
             openapi_extra=_image_body_doc(ImageBody))
async def add_image(request: Request):
    services = get_services(request)
    images = _require_images(services)
    body, data = _decode_image(await _image_fields(request), ImageBody)

    # On the write lane, with the other writes: image searches never queue behind a store write.
    return {"object": "image", **await submit(services, "write", lambda: images.add(body.id, data, body.payload))}


@router.post("/v1/images/search", tags=["images"], summary="Similar images: preprocess, ResNet-50, search, metadata",
             openapi_extra=_image_body_doc(ImageSearchBody))
async def search_images(request: Request):
    services = get_services(request)
    _require_images(services)
    body, data = _decode_image(await _image_fields(request), ImageSearchBody)
    # Searches arriving together share one preprocess + ResNet forward (the images lane batches them).
    out = await submit(services, "images", {"data": data, "k": body.k, "filter": body.filter,
                                           "score_threshold": body.score_threshold}, key="search")
    return {"object": "list", **out}
