"""Model endpoints: /v1/classify, /v1/embeddings, /v1/completions (OpenAI
compatible, streaming as server-sent events) and the seed's /generate."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from ..errors import InputError
from . import rules
from .openapi import Int, NonEmpty, Seed, Text, bounded_int
from .deps import NumpyJSONResponse, check_model_name, get_services, model_id, require_model, submit
from .generation import FINISH_REASONS, admit_generation, complete, sse, sse_response, usage
from .services import Services

router = APIRouter()
# Short inputs are tokenized on the event loop (tens of µs: less than the hop
# to a worker thread); longer ones in a thread so the loop never stalls.
INLINE_TOKENIZE_CHARS = 4096


async def _tokenize(model, texts: list[str], truncate: bool, services: Services) -> list[list[int]]:
    cfg = services.config.models
    if sum(len(t) for t in texts) <= INLINE_TOKENIZE_CHARS:
        return rules.tokenize_inputs(model, texts, truncate, cfg)
    return await run_in_threadpool(rules.tokenize_inputs, model, texts, truncate, cfg)


def _no_token_arrays(value, what: str):
    """OpenAI also accepts token-id arrays; this server takes text only, and says so once
    (pydantic would list one 'should be a valid string' per element)."""
    items = value if isinstance(value, list) else [value]
    if any(isinstance(v, int) and not isinstance(v, bool) or isinstance(v, list) for v in items):
        raise ValueError(f"{what} must be text: token-id arrays are not supported (LangChain's "
                         "OpenAIEmbeddings sends them unless check_embedding_ctx_length=False)")
    return value


# -- /v1/embeddings -------------------------------------------------------------------------

class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # OpenAI clients send fields we do not use (user)
    input: Text | list[Text] = Field(description="A string or a list of strings")
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int | None = Field(None, description="the model's dimension (384 for MiniLM) or null")
    truncate: bool = Field(False, description="tallow: cut inputs over the token limit instead of a 422")

    @field_validator("input", mode="before")
    @classmethod
    def _text_only(cls, v):
        return _no_token_arrays(v, "input")


@router.post("/v1/embeddings", tags=["models"], summary="Sentence embeddings (OpenAI compatible)")
async def embeddings(body: EmbeddingsRequest, request: Request):
    services = get_services(request)
    check_model_name(services, "embedder", body.model)
    model = require_model(services, "embedder")
    dim = model.config.hidden_size
    if body.dimensions is not None and body.dimensions != dim:
        raise InputError(f"dimensions={body.dimensions} is not supported: this model gives {dim}-d vectors",
                         param="dimensions")
    texts = rules.text_inputs(body.input, services.config.models)
    ids = await _tokenize(model, texts, body.truncate, services)
    tokens = sum(len(s) for s in ids)
    vecs = await submit(services, "embeddings", ids, size=len(ids), tokens=tokens)
    data = []
    for i, v in enumerate(vecs):
        v = np.ascontiguousarray(v, dtype="<f4")
        emb = base64.b64encode(v.tobytes()).decode() if body.encoding_format == "base64" else v
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return NumpyJSONResponse({"object": "list", "data": data, "model": model_id(services, "embedder"),
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


# -- /v1/classify ---------------------------------------------------------------------------

class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    input: Text | list[Text]
    model: str | None = None
    truncate: bool = False


@router.post("/v1/classify", tags=["models"], summary="Sequence classification (e.g. sentiment)")
async def classify(body: ClassifyRequest, request: Request):
    services = get_services(request)
    check_model_name(services, "classifier", body.model)
    model = require_model(services, "classifier")
    texts = rules.text_inputs(body.input, services.config.models)
    ids = await _tokenize(model, texts, body.truncate, services)
    tokens = sum(len(s) for s in ids)
    rows = await submit(services, "classify", ids, size=len(ids), tokens=tokens)
    return {"object": "list", "model": model_id(services, "classifier"),
            "data": [{"index": i, **row} for i, row in enumerate(rows)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


# -- /v1/completions and /generate ----------------------------------------------------------

def _bool_only(v):
    if not isinstance(v, bool):  # Literal[False] alone takes 0 (0 == False)
        raise ValueError("must be a boolean")
    return v


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    prompt: Text | list[Text]
    model: str | None = None
    max_tokens: Int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Int = Field(0, ge=0, description="tallow: keep the k most likely tokens (0: off)")
    repetition_penalty: float = Field(1.0, gt=0.0, description="tallow: CTRL-style penalty (1: off)")
    n: Int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = Field(None, description='{"include_usage": true}: a last chunk with usage')
    stop: NonEmpty | Annotated[list[NonEmpty], Field(max_length=4)] | None = Field(None, description="up to 4 strings")
    seed: Seed | None = None
    echo: Annotated[Literal[False], BeforeValidator(_bool_only)] = Field(False, description="not supported: false")
    logprobs: None = Field(None, description="not supported: null")
    best_of: bounded_int(ge=1, le=1) | None = Field(None, description="not supported: 1 or null")
    truncate: bool = Field(False, description="tallow: keep the end of an over-long prompt instead of a 422")

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_only(cls, v):
        return _no_token_arrays(v, "prompt")


@router.post("/v1/completions", tags=["models"], summary="GPT-2 text completion (OpenAI compatible)")
async def completions(body: CompletionRequest, request: Request):
    services = get_services(request)
    check_model_name(services, "generator", body.model)
    model = require_model(services, "generator")
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not prompts:
        raise InputError("prompt must be a string or a non-empty list of strings", param="prompt")
    req, prompt_tokens = await run_in_threadpool(rules.completion_job, services.config.models, model, prompts, body)
    cid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model_id(services, "generator")
    if not body.stream:
        rows = await complete(services, model, req)
        completion_tokens = sum(r["completion_tokens"] for r in rows)
        return {"id": cid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"text": r["text"], "index": i, "logprobs": None,
                             "finish_reason": FINISH_REASONS[r["finish_reason"]]} for i, r in enumerate(rows)],
                "usage": usage(prompt_tokens, completion_tokens)}
    stream = admit_generation(services, model, req)  # 429 / 422 / 503 before the stream starts
    base = {"id": cid, "object": "text_completion", "created": created, "model": name}

    def render(event) -> list[dict]:
        reason = event.finish_reason
        return [{**base, "choices": [{"text": event.text, "index": event.row, "logprobs": None,
                                      "finish_reason": FINISH_REASONS.get(reason) if reason else None}]}]

    def usage_chunk(tokens: int) -> dict:  # OpenAI's stream_options.include_usage: usage, no choices
        return {**base, "choices": [], "usage": usage(prompt_tokens, tokens)}

    include_usage = bool((body.stream_options or {}).get("include_usage"))
    return sse_response(stream, sse(services, stream, render, usage_chunk=usage_chunk if include_usage else None))


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: Text
    max_tokens: Int = Field(32, ge=0)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Int = Field(0, ge=0)
    seed: Seed | None = None


@router.post("/generate", tags=["models"], summary="The seed's text generation: {prompt, max_tokens}")
async def generate(body: GenerateRequest, request: Request):
    t0 = time.perf_counter()
    services = get_services(request)
    model = require_model(services, "generator")
    as_completion = CompletionRequest(prompt=body.prompt, max_tokens=body.max_tokens,
                                      temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                      seed=body.seed)
    req, _ = await run_in_threadpool(rules.completion_job, services.config.models, model, [body.prompt],
                                     as_completion)
    rows = await complete(services, model, req)
    return {"generated_text": rows[0]["text"], "finish_reason": FINISH_REASONS[rows[0]["finish_reason"]],
            "latency_ms": round((time.perf_counter() - t0) * 1000, 3)}
