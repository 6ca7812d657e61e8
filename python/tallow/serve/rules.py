"""The server's request rules as plain functions (no HTTP, callable from
tests): per-request limits, input checks, tokenization with or without
truncation, and which requests may share a batch (the batching key). Each
raises ``tallow.errors.InputError`` naming the offending field; the server
answers it as a 422 in ``errors``.
"""

from __future__ import annotations

import itertools
from typing import Any

from ..errors import InputError, check_utf8
from .config import ModelsConfig
from .services import GenerationRequest

_unique = itertools.count()
_token_chars: dict[int, int] = {}


def unique_key(tag: str) -> tuple:
    """A batching key no other request has: the request runs alone."""
    return (tag, next(_unique))


def max_token_chars(model) -> int:
    """The most characters one token of the model's vocabulary decodes to (its
    longest token string: byte-level BPE writes one character per byte)."""
    key = id(model.tokenizer)
    if key not in _token_chars:
        _token_chars[key] = max(len(t) for t in model.tokenizer._tok.get_vocab())
    return _token_chars[key]


# -- the BERT endpoints (/v1/embeddings, /v1/classify) -------------------------------------

def text_inputs(value: str | list[str], cfg: ModelsConfig) -> list[str]:
    """``input`` as a non-empty list of non-blank UTF-8 strings, at most
    ``models.max_inputs_per_request`` of them."""
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise InputError("input must be a non-empty string or a non-empty list of strings", param="input")
    limit = cfg.max_inputs_per_request
    if len(texts) > limit:
        raise InputError(f"input has {len(texts)} items; the limit is {limit} per request "
                         "(models.max_inputs_per_request)", param="input")
    for i, t in enumerate(texts):
        if not t.strip():
            raise InputError(f"input[{i}] is empty or only whitespace", param=f"input[{i}]")
        check_utf8(t, f"input[{i}]", param=f"input[{i}]")
    return texts


def tokenize_inputs(model, texts: list[str], truncate: bool, cfg: ModelsConfig) -> list[list[int]]:
    """Token ids of each input: over ``models.max_input_tokens`` (capped by the
    model) an input is cut when ``truncate``, refused otherwise."""
    from ..models.tokenizer import InputTooLongError

    tok = model.tokenizer
    limit = min(cfg.max_input_tokens or tok.max_length, tok.max_length)
    try:
        return tok.encode_ids(texts, truncation=truncate, max_length=limit)
    except InputTooLongError as exc:
        what = str(exc).split(" (pass truncation")[0]  # "input 3 has 700 tokens; the limit is 512"
        raise InputError(f"{what} (models.max_input_tokens, capped by the model); send \"truncate\": true "
                         "to cut long inputs instead", param="input", kind="too_long") from None
    except (ValueError, TypeError) as exc:
        raise InputError(str(exc), param="input") from None


# -- /v1/completions and /generate ---------------------------------------------------------

def context_length(model) -> int:
    """Positions the generator holds (prompt + completion)."""
    cfg = model.config
    for name in ("n_positions", "context_length", "max_position_embeddings"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise TypeError(f"{type(model).__name__}'s config names no context length")


def sampling_params(cfg: ModelsConfig, body: Any, prompts: int, *, param: str = "prompt"):
    """The sampling settings of a completion or chat request (fields of
    ``routes_text.CompletionRequest``: max_tokens, n, stop, temperature, top_p,
    top_k, repetition_penalty, seed), checked against the limits; ``prompts``
    x n rows are counted against ``models.max_completion_rows``, refused
    naming ``param``."""
    from ..models.generation import SamplingParams

    if body.max_tokens > cfg.max_completion_tokens:
        raise InputError(f"max_tokens={body.max_tokens} is over the limit of {cfg.max_completion_tokens} "
                         "(models.max_completion_tokens)", param="max_tokens")
    if body.n > cfg.max_n:
        raise InputError(f"n={body.n} is over the limit of {cfg.max_n} (models.max_n)", param="n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise InputError("stop must be up to 4 non-empty strings", param="stop")
    if prompts * body.n > cfg.max_completion_rows:
        # Every row holds a KV cache of its own: rows are what costs memory.
        raise InputError(f"{prompts} prompts x n={body.n} = {prompts * body.n} completions; the "
                         f"limit is {cfg.max_completion_rows} per request (models.max_completion_rows)",
                         param=param)
    params = SamplingParams(max_new_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k,
                            top_p=body.top_p, repetition_penalty=body.repetition_penalty, stop=tuple(stop),
                            seed=body.seed)
    try:
        params.validate()
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return params


def completion_job(cfg: ModelsConfig, model, prompts: list[str], body: Any) -> tuple[GenerationRequest, int]:
    """Checks a completion request against the limits, tokenizes its prompts
    (keeping only the end of an over-long one when ``body.truncate``) and
    returns (the request's rows and sampling settings, prompt tokens).
    ``body`` has the fields of ``routes_text.CompletionRequest``."""
    if body.echo or body.logprobs is not None or (body.best_of or 1) > 1:
        field = "echo" if body.echo else ("logprobs" if body.logprobs is not None else "best_of")
        raise InputError(f"{field} is not supported by this server", param=field)
    params = sampling_params(cfg, body, len(prompts))
    prompts = list(prompts)
    context = context_length(model)
    room = context - body.max_tokens
    limit = min(room, cfg.max_input_tokens or room)
    longest_token = max_token_chars(model)
    for i, p in enumerate(prompts):
        check_utf8(p, f"prompt[{i}]", param=f"prompt[{i}]")
        # No token is longer than the vocabulary's longest, so a prompt longer
        # than limit x that is over the limit for sure: refuse it (or keep only
        # its tail) before spending time tokenizing all of it.
        if len(p) > max(limit, 1) * longest_token:
            if not body.truncate or limit < 1:
                raise InputError(f"prompt {i} has {len(p)} characters, more than the model's context of "
                                 f"{context} tokens can hold with max_tokens={body.max_tokens} (send "
                                 "\"truncate\": true to keep the end of the prompt)", param="prompt",
                                 kind="too_long")
            prompts[i] = p[-limit * longest_token:]
    try:
        ids = model.tokenizer.encode_unbounded(prompts)
    except (ValueError, TypeError) as exc:
        raise InputError(str(exc), param="prompt") from None
    for i, seq in enumerate(ids):
        if len(seq) > limit:
            if not body.truncate or limit < 1:
                raise InputError(f"prompt {i} has {len(seq)} tokens; with max_tokens={body.max_tokens} the "
                                 f"limit is {limit} (the model's context is {context}; send \"truncate\": true "
                                 "to keep the end of the prompt)", param="prompt", kind="too_long")
            ids[i] = seq[-limit:]
    rows = [seq for seq in ids for _ in range(body.n)]  # choice index = prompt * n + j
    return GenerationRequest(rows, params), sum(len(s) for s in ids)


def chat_job(cfg: ModelsConfig, model, messages: list, body: Any) -> tuple[GenerationRequest, int]:
    """A chat request as a completion: the conversation rendered with the
    model's chat template and tokenized (n rows of it), its sampling settings
    checked as a completion's (``body.max_tokens`` None: as many tokens as
    the context leaves, up to ``models.max_completion_tokens``), and the
    token ids that end a reply (the eos, the template's end of turn) as its
    ``stop_token_ids``. Returns (request, prompt tokens). An over-long conversation is
    refused (cutting it would cut the system message)."""
    from ..engine.chat import chat_prompt, encode_chat_prompt, stop_token_ids

    prompt = chat_prompt(model, messages)
    context = context_length(model)
    limit = min(context, cfg.max_input_tokens or context)
    # No token is longer than the vocabulary's longest: a longer text is over the limit for sure.
    if len(prompt) > limit * max_token_chars(model):
        raise InputError(f"the conversation is {len(prompt)} characters once rendered with the chat template, "
                         f"more than the model's context of {context} tokens can hold", param="messages",
                         kind="too_long")
    try:
        ids = encode_chat_prompt(model, prompt)
    except ValueError as exc:  # the template rendered nothing but whitespace
        raise InputError(f"the chat template rendered this conversation as an empty prompt ({exc})",
                         param="messages") from None
    if len(ids) >= limit:
        raise InputError(f"the conversation is {len(ids)} tokens once rendered with the chat template; the "
                         f"limit is {limit - 1} (the model's context is {context}, models.max_input_tokens), "
                         "leaving room for a reply", param="messages", kind="too_long")
    room = context - len(ids)
    if body.max_tokens is None:
        body = body.model_copy(update={"max_tokens": min(room, cfg.max_completion_tokens)})
    elif body.max_tokens > room and body.max_tokens <= cfg.max_completion_tokens:
        raise InputError(f"max_tokens={body.max_tokens} does not fit: the conversation takes {len(ids)} of the "
                         f"model's {context} positions, leaving {room}", param="max_tokens", kind="too_long")
    params = sampling_params(cfg, body, 1, param="n")
    # The scheduler ends a row at these (finish_reason "stop") as soon as it samples one.
    params.stop_token_ids = tuple(sorted(stop_token_ids(model, model.chat_template)))
    return GenerationRequest([ids] * body.n, params), len(ids)


# -- /v1/rag and /v1/documents -------------------------------------------------------------

def check_rag(max_tokens: int, cfg: ModelsConfig) -> None:
    limit = cfg.max_completion_tokens
    if max_tokens > limit:
        raise InputError(f"max_tokens={max_tokens} is over the limit of {limit} "
                         "(models.max_completion_tokens)", param="max_tokens")


def check_documents(documents: list, max_inputs: int, max_chars: int) -> list[dict]:
    """Every document checked before anything is written: at most
    ``max_inputs`` of them, each valid for the engine and at most
    ``max_chars`` characters long (a write holds the write lock; bound how long).
    Returns the documents to ingest, as the schema describes them: an integral
    float timestamp (1.0: an integer to JSON Schema) as an int, and a document
    repeated exactly (the same id, or no id and the same text, and the same
    fields) once, as sending it twice would store it once. Two different
    documents with one id are refused: which one to keep is the client's call."""
    from ..engine.documents import RepeatedId, normalize_document, unique_documents

    if len(documents) > max_inputs:
        raise InputError(f"{len(documents)} documents in one request; the limit is {max_inputs} "
                         "(models.max_inputs_per_request)", param="documents")
    out: list[dict] = []
    for i, doc in enumerate(documents):
        if isinstance(doc, dict) and isinstance(doc.get("timestamp"), float) and doc["timestamp"].is_integer():
            doc = {**doc, "timestamp": int(doc["timestamp"])}
        try:
            norm = normalize_document(doc, i)
        except (ValueError, TypeError) as exc:
            raise InputError(str(exc), param=f"documents[{i}]") from None
        if len(doc["text"]) > max_chars:
            raise InputError(f"documents[{i}] has {len(doc['text'])} characters; the limit is {max_chars} "
                             "(data.max_document_chars): split it into several documents",
                             param=f"documents[{i}]")
        out.append(norm)
    try:
        return [out[i] for i in unique_documents(out)]
    except RepeatedId as exc:
        raise InputError(f"documents[{exc.index}] has the id {exc.doc_id!r} of an earlier document with other "
                         "content (ids are unique; without one, the id is the text's sha256)",
                         param=f"documents[{exc.index}]") from None
