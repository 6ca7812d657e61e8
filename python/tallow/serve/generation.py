"""Completions over continuous batching: the server's side of it.

The scheduler (``tallow.models.scheduler``, in the generator's worker)
decodes every running row one token per step; a request joins the running
batch at the next step and each row leaves when it finishes. Here:

- ``row_params``: one ``SamplingParams`` per row. A seeded request's row r
  draws from its own generator seeded ``seed + r``, so what it produces does
  not depend on what else runs beside it.
- ``GenerationStream``: one request's events, read on the event loop; the
  worker's thread hands them over with ``call_soon_threadsafe``.
- ``generate_blocking``: ``GPT2LMHeadModel.generate``'s contract for a
  thread (the engine's RAG answers), through the same scheduler; it waits
  at most ``timeout_s`` (the server passes ``server.request_timeout_s``),
  then cancels its rows in the worker and raises ``GenerationTimeout``.

Admission (how many completions may wait or run) is the ``generate`` lane's
``max_queue``: ``Services.generation_slots``.

The routes' side (the end of this file): /v1/completions, /v1/chat/completions
and /generate share admission, the event stream with its metrics and
timeout, the whole-answer collector and the server-sent events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import queue
import time
from typing import Any, AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from ..errors import InputError

_request_ids = itertools.count()


def row_params(params: Any, rows: int) -> list:
    """``rows`` copies of ``params``; row r of a seeded request gets seed + r."""
    if params.seed is None:
        return [params] * rows
    return [dataclasses.replace(params, seed=(int(params.seed) + r) % 2**64) for r in range(rows)]


def _failure(exc: BaseException) -> BaseException:
    """A request the scheduler refused is the caller's input (422) unless it is
    already one of tallow's errors (a worker that died stays a 503)."""
    if isinstance(exc, ValueError) and not isinstance(exc, InputError):
        return InputError(str(exc))
    return exc


class GenerationTimeout(TimeoutError):
    """A generation did not finish within its time limit; its rows were cancelled."""


class GenerationStream:
    """The events of one request (``RowEvent``s), in order; ``close()`` stops
    its rows at the next step and calls ``on_close(stream)`` once (the
    caller's admission slot goes back there, however the request ended)."""

    def __init__(self, model: Any, prompt_ids: list[list[int]], params: Any,
                 on_close: Callable[["GenerationStream"], None] | None = None):
        """A chat reply's end of turn is one of ``params.stop_token_ids``: the
        scheduler ends that row itself (finish_reason "stop")."""
        self.loop = asyncio.get_running_loop()
        self.rows = len(prompt_ids)
        self.request_id = f"g{next(_request_ids)}"
        self._queue: asyncio.Queue = asyncio.Queue()
        self.finished = False  # every row finished
        self._closed = False
        self._on_close = on_close
        try:
            self._worker = model.start_generation(self.request_id, prompt_ids, row_params(params, self.rows),
                                                  self._sink)
        except Exception as exc:
            raise _failure(exc) from None

    def _sink(self, item: Any) -> None:  # a worker's thread
        self.loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def events(self, deadline: float) -> AsyncIterator[Any]:
        """Yields events until every row has finished; raises the worker's
        failure (``WorkerDied``: 503) or ``TimeoutError`` past ``deadline``
        (``time.monotonic()``)."""
        unfinished = self.rows
        try:
            while unfinished:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except (asyncio.TimeoutError, TimeoutError):
                    raise TimeoutError from None
                if isinstance(item, BaseException):
                    raise _failure(item)
                for event in item:
                    if event.finish_reason == "error":
                        raise RuntimeError(f"generation failed: {event.error}")
                    if event.finish_reason is not None:
                        unfinished -= 1
                    yield event
            self.finished = True
        finally:
            self.close()

    def close(self) -> None:
        """Forgets the request; rows that have not finished (a client that
        left, a timeout) stop at the scheduler's next step. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.finished:
                self._worker.finished(self.request_id)
            else:
                self._worker.cancel(self.request_id)
        finally:
            if self._on_close is not None:
                self._on_close(self)


def generate_blocking(model: Any, prompts: list, kwargs: dict, timeout_s: float) -> list:
    """Completes ``prompts`` (texts, or lists of token ids) like
    ``GPT2LMHeadModel.generate`` (kwargs: ``SamplingParams`` fields; a row
    ends at ``stop_token_ids`` too, with finish_reason "stop"), blocking this thread for at most
    ``timeout_s``: past it the rows are cancelled in the worker and
    ``GenerationTimeout`` is raised (a worker that stalls, a batch too full
    to make progress: the caller's thread is never held forever)."""
    from ..models.generation import SamplingParams
    from ..models.gpt2 import Generation

    if not timeout_s > 0:
        raise ValueError(f"generate_blocking: timeout_s must be > 0, got {timeout_s!r}")
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    params = SamplingParams(**kwargs)
    params.validate()
    prompts = list(prompts)
    # Token ids as they are (a chat prompt, tokenized as its template requires: engine.chat), or texts.
    prompt_ids = ([list(p) for p in prompts] if prompts and not isinstance(prompts[0], str)
                  else model.tokenizer.encode_ids(prompts))
    inbox: queue.Queue = queue.Queue()
    request_id = f"b{next(_request_ids)}"
    worker = model.start_generation(request_id, prompt_ids, row_params(params, len(prompt_ids)), inbox.put)
    texts = [""] * len(prompt_ids)
    ids: list[list[int]] = [[] for _ in prompt_ids]
    reasons = ["length"] * len(prompt_ids)
    first: list[float | None] = [None] * len(prompt_ids)
    unfinished = len(prompt_ids)
    try:
        while unfinished:
            try:
                item = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise GenerationTimeout(f"the generation did not finish within {timeout_s:g} s "
                                        "(server.request_timeout_s); its rows were cancelled") from None
            if isinstance(item, BaseException):
                raise _failure(item)
            for e in item:
                if e.finish_reason == "error":
                    raise RuntimeError(f"generation failed: {e.error}")
                ids[e.row].append(e.token_id)
                texts[e.row] += e.text
                if first[e.row] is None:
                    first[e.row] = time.perf_counter() - t0
                if e.finish_reason is not None:
                    reasons[e.row] = e.finish_reason
                    unfinished -= 1
    finally:
        if unfinished:
            worker.cancel(request_id)
        else:
            worker.finished(request_id)
    total = time.perf_counter() - t0
    return [Generation(texts[i], toks, reasons[i], len(prompt_ids[i]),
                       first[i] if first[i] is not None else total, total) for i, toks in enumerate(ids)]


# -- the routes' side: one generation service for /v1/completions, /v1/chat/completions and /generate --
#
# Each route turns its body into a ``GenerationRequest`` (``rules.completion_job``,
# ``rules.chat_job``), then: ``complete`` (the whole answer) or ``admit_generation``
# + ``sse`` + ``sse_response`` (server-sent events, one chunk list per token, the
# route's ``render`` giving the chunks).

# The scheduler's reasons as the OpenAI API names them.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def admit_generation(services: Any, model: Any, req: Any) -> GenerationStream | None:
    """Admits a request (429 when ``batching.generate.max_queue`` are in
    flight) and starts its rows in the scheduler; None for max_tokens=0
    (nothing to generate)."""
    from .admission import admit

    admit(services, services.generation_slots)
    if req.params.max_new_tokens == 0:
        services.generation_slots.leave()
        return None

    def release(stream: GenerationStream) -> None:  # once, when the stream closes
        if not stream.finished:
            services.metrics.generations_cancelled.inc()
        services.generation_slots.leave()

    try:
        return GenerationStream(model, req.prompt_ids, req.params, on_close=release)
    except BaseException:
        services.generation_slots.leave()
        raise


async def _events(services: Any, stream: GenerationStream | None, admitted: float):
    """The stream's events, with the request timeout, time-to-first-token and
    token metrics; closing the stream (however it ends) leaves the admission gate."""
    if stream is None:
        return
    metrics = services.metrics
    first = True
    try:
        async for event in stream.events(time.monotonic() + services.config.server.request_timeout_s):
            if first:
                first = False
                metrics.time_to_first_token.observe(time.monotonic() - admitted)
            metrics.tokens_generated.inc()
            yield event
    finally:
        stream.close()  # a client that left, a timeout: its rows stop at the next step


async def complete(services: Any, model: Any, req: Any) -> list[dict]:
    """Runs a request to its end: one dict per row (text, completion_tokens,
    finish_reason as the scheduler names it, prompt_tokens)."""
    from .errors import APIError

    stream = admit_generation(services, model, req)
    n = len(req.prompt_ids)
    texts, counts = [""] * n, [0] * n
    reasons: list[str] = ["length"] * n
    try:
        async for e in _events(services, stream, req.admitted):
            texts[e.row] += e.text
            counts[e.row] += 1
            if e.finish_reason:
                reasons[e.row] = e.finish_reason
    except TimeoutError:
        raise APIError(504, "the completion did not finish within server.request_timeout_s") from None
    return [{"text": texts[i], "completion_tokens": counts[i], "finish_reason": reasons[i],
             "prompt_tokens": len(req.prompt_ids[i])} for i in range(n)]


def _data(chunk: dict) -> str:
    return f"data: {json.dumps(chunk)}\n\n"


async def sse(services: Any, stream: GenerationStream | None, render: Callable[[Any], list[dict]], *,
              head: list[dict] = (), usage_chunk: Callable[[int], dict] | None = None):
    """Server-sent events: ``head``'s chunks, then ``render(event)``'s for each
    token, then ``usage_chunk(completion tokens)`` when given, then
    ``data: [DONE]``. A failure mid-stream is an error chunk (the status is
    sent already). A client that goes away: Starlette cancels this
    generator, the stream's rows stop at the next step."""
    from ..errors import Unavailable

    for chunk in head:
        yield _data(chunk)
    tokens = 0
    try:
        async for event in _events(services, stream, time.monotonic()):
            tokens += 1
            for chunk in render(event):
                yield _data(chunk)
    except TimeoutError:
        yield _data({"error": {"message": "the completion did not finish within server.request_timeout_s",
                               "type": "timeout_error", "param": None, "code": 504}})
        yield "data: [DONE]\n\n"
        return
    except Exception as exc:  # the worker died (503), the scheduler failed (500)
        status = getattr(exc, "status", None) or (503 if isinstance(exc, Unavailable) else 500)
        yield _data({"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None,
                               "code": status}})
        yield "data: [DONE]\n\n"
        return
    if usage_chunk is not None:
        yield _data(usage_chunk(tokens))
    yield "data: [DONE]\n\n"


def sse_response(stream: GenerationStream | None, body) -> "GenerationResponse":
    return GenerationResponse(stream, body, media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class GenerationResponse(StreamingResponse):
    """Closes its stream however the response ends. A client that leaves
    before the first byte is sent cancels the response before its body is
    ever iterated, so no ``finally`` in the body runs: without this the
    rows would run on and the admission slot never come back."""

    def __init__(self, stream: GenerationStream | None, content, **kwargs):
        super().__init__(content, **kwargs)
        self._stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._stream is not None:
                self._stream.close()
