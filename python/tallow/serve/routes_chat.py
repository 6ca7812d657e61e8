"""/v1/chat/completions (OpenAI compatible): the conversation rendered with
the generator's own chat template (``tallow.engine.chat``), then generated
as a completion by the same service as /v1/completions (admission, the
continuous-batching scheduler, timeouts, metrics: ``serve.generation``).
A reply ends at the model's eos or the template's end-of-turn token
(finish_reason "stop"), at a stop string, or at max_tokens ("length")."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from starlette.concurrency import run_in_threadpool

from ..errors import InputError
from . import rules
from .deps import check_model_name, get_services, model_id, require_model
from .generation import FINISH_REASONS, admit_generation, complete, sse, sse_response, usage
from .openapi import Int, NonEmpty, Seed

router = APIRouter()


# The schema states what is accepted; the checks themselves are
# engine.chat.normalize_messages's, whose errors name the field and say why
# (pydantic's for a union of literals would list every alternative).
_ROLE_SCHEMA = {"type": "string", "enum": ["system", "developer", "user", "assistant"]}
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
_CONTENT_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}],
                   "description": 'a string, or text parts [{"type": "text", "text": ...}] (joined by newlines); '
                                  "null only for an assistant turn"}


class ChatMessage(BaseModel):
    # OpenAI messages carry fields this server does not use (tool_call_id, refusal, audio)
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Annotated[str, WithJsonSchema(_ROLE_SCHEMA)] = Field(
        description="system, developer (taken as system), user or assistant")
    content: Annotated[str | list[dict] | None, WithJsonSchema(_CONTENT_SCHEMA)] = None
    name: str | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # OpenAI clients send fields we do not use (user)
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation, oldest first")
    model: str | None = None
    max_tokens: Int | None = Field(None, ge=0, description="null: as many as the context leaves, up to "
                                                           "models.max_completion_tokens")
    max_completion_tokens: Int | None = Field(None, ge=0, description="OpenAI's newer name for max_tokens "
                                                                      "(wins when both are given)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Int = Field(0, ge=0, description="tallow: keep the k most likely tokens (0: off)")
    repetition_penalty: float = Field(1.0, gt=0.0, description="tallow: CTRL-style penalty (1: off)")
    n: Int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = Field(None, description='{"include_usage": true}: a last chunk with usage')
    stop: NonEmpty | Annotated[list[NonEmpty], Field(max_length=4)] | None = Field(None, description="up to 4 strings")
    seed: Seed | None = None
    logprobs: bool | None = Field(None, description="not supported: false or null")
    tools: list | None = Field(None, description="not supported: null or []")
    response_format: dict | None = Field(None, description='not supported but {"type": "text"}')


def _unsupported(body: ChatCompletionRequest) -> None:
    if body.logprobs:
        raise InputError("logprobs is not supported by this server", param="logprobs")
    if body.tools:
        raise InputError("tools (function calling) are not supported by this server", param="tools")
    if body.response_format is not None and body.response_format.get("type", "text") != "text":
        raise InputError(f"response_format {body.response_format.get('type')!r} is not supported by this server "
                         "(only \"text\")", param="response_format")


@router.post("/v1/chat/completions", tags=["models"],
             summary="Chat completion with the model's chat template (OpenAI compatible)")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    services = get_services(request)
    check_model_name(services, "generator", body.model)
    model = require_model(services, "generator")
    _unsupported(body)
    if body.max_completion_tokens is not None:
        body = body.model_copy(update={"max_tokens": body.max_completion_tokens})
    messages = [m.model_dump() for m in body.messages]
    req, prompt_tokens = await run_in_threadpool(rules.chat_job, services.config.models, model, messages, body)
    cid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model_id(services, "generator")
    base = {"id": cid, "object": "chat.completion", "created": created, "model": name,
            "system_fingerprint": None}
    if not body.stream:
        rows = await complete(services, model, req)
        return {**base, "choices": [
            {"index": i, "message": {"role": "assistant", "content": r["text"], "refusal": None},
             "logprobs": None, "finish_reason": FINISH_REASONS[r["finish_reason"]]} for i, r in enumerate(rows)],
            "usage": usage(prompt_tokens, sum(r["completion_tokens"] for r in rows))}
    stream = admit_generation(services, model, req)  # 429 / 422 / 503 before the stream starts
    base = {**base, "object": "chat.completion.chunk"}

    def chunk(index: int, delta: dict, finish_reason: str | None = None) -> dict:
        return {**base, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                     "finish_reason": finish_reason}]}

    # Every choice opens with its role (as OpenAI streams it); with nothing to
    # generate (max_tokens 0) it closes at once.
    rows = range(len(req.prompt_ids))
    head = [chunk(i, {"role": "assistant", "content": ""}) for i in rows]
    if stream is None:
        head += [chunk(i, {}, "length") for i in rows]

    def render(event: Any) -> list[dict]:
        out = [chunk(event.row, {"content": event.text})] if event.text else []
        if event.finish_reason:
            out.append(chunk(event.row, {}, FINISH_REASONS.get(event.finish_reason)))
        return out

    def usage_chunk(tokens: int) -> dict:  # stream_options.include_usage: usage, no choices
        return {**base, "choices": [], "usage": usage(prompt_tokens, tokens)}

    include_usage = bool((body.stream_options or {}).get("include_usage"))
    return sse_response(stream, sse(services, stream, render, head=head,
                                    usage_chunk=usage_chunk if include_usage else None))
