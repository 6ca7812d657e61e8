"""Documents as the engine stores them: the input check (``normalize_document``),
the content hash that decides whether a document must be re-embedded, and
the fields filters see (the same in the vector index and the FTS search).
``EngineError`` (an ``InputError``) is the engine's bad-input error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import InputError, check_utf8
from .derived_index import HASH_KEY

DOC_KEYS = {"id", "title", "text", "category", "timestamp", "payload"}


class EngineError(InputError):
    """Bad input to the engine (documents, queries, settings)."""


@dataclass
class IngestSummary:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    chunks: int = 0
    seconds: float = 0.0

    @property
    def documents(self) -> int:
        return self.added + self.updated + self.unchanged

    def to_dict(self) -> dict:
        return {**asdict(self), "documents": self.documents,
                "documents_per_s": self.documents / self.seconds if self.seconds > 0 else None}


def content_hash(doc: dict, chunk_tokens: int, overlap: int, embedder_id: str) -> str:
    """What decides whether a stored document must be re-chunked and re-embedded:
    its content, the chunking settings and the embedding model (``model_identity``)."""
    canon = {k: doc.get(k) for k in ("text", "title", "category", "timestamp")}
    canon["payload"] = doc.get("payload") or {}
    canon["chunking"] = [chunk_tokens, overlap]
    canon["embedder"] = embedder_id
    return hashlib.sha256(json.dumps(canon, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def normalize_document(doc: Any, i: int = 0) -> dict:
    """Checks one input document; returns {id, title, text, category, timestamp, payload}."""
    if not isinstance(doc, dict):
        raise EngineError(f"document {i} must be a dict, got {type(doc).__name__}")
    unknown = set(doc) - DOC_KEYS
    if unknown:
        raise EngineError(f"document {i} has unknown fields {sorted(unknown)} (allowed: {sorted(DOC_KEYS)}; "
                          "put anything else in 'payload')")
    text = doc.get("text")
    if not isinstance(text, str):
        raise EngineError(f"document {i}: text must be a str, got {type(text).__name__}")
    check_utf8(text, f"document {i}: text", error=EngineError)
    if not text.strip():
        raise EngineError(f"document {i}" + (f" ({doc['id']!r})" if doc.get("id") else "") + ": text is empty")
    doc_id = doc.get("id")
    if doc_id is None:
        doc_id = "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:24]
    if not isinstance(doc_id, str) or not doc_id:
        raise EngineError(f"document {i}: id must be a non-empty str, got {doc_id!r}")
    check_utf8(doc_id, f"document {i}: id", error=EngineError)
    for name in ("title", "category"):
        v = doc.get(name)
        if v is not None and not isinstance(v, str):
            raise EngineError(f"document {doc_id!r}: {name} must be a str or None, got {type(v).__name__}")
        if v is not None:
            check_utf8(v, f"document {doc_id!r}: {name}", error=EngineError)
    ts = doc.get("timestamp")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int)):
        raise EngineError(f"document {doc_id!r}: timestamp must be an int (Unix seconds) or None, got {ts!r}")
    payload = doc.get("payload") or {}
    if not isinstance(payload, dict):
        raise EngineError(f"document {doc_id!r}: payload must be a dict, got {type(payload).__name__}")
    if HASH_KEY in payload or "_tallow_id" in payload:
        raise EngineError(f"document {doc_id!r}: payload fields starting with '_tallow' are reserved")
    try:
        json.dumps(payload, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise EngineError(f"document {doc_id!r}: payload is not JSON-serialisable UTF-8: {exc}") from exc
    return {"id": doc_id, "title": doc.get("title"), "text": text, "category": doc.get("category"),
            "timestamp": ts, "payload": payload}


def filter_fields(doc: dict) -> dict:
    """The fields filters see: the payload, shadowed by id/title/category/timestamp
    (the same document as the store's ``filter_doc``, so filters mean the same
    in the vector index and in the FTS search)."""
    out = dict(doc.get("payload") or {})
    for k in ("id", "title", "category", "timestamp"):
        if doc.get(k) is not None:
            out[k] = doc[k]
    return out


def index_payload(chunk_or_doc: dict, h: str | None = None) -> dict:
    """A chunk's payload in the vector index: its document's filter fields (a
    chunk row from the store names its document ``doc_id``); with ``h``, the
    content hash under ``HASH_KEY`` too."""
    doc = {"id": chunk_or_doc.get("doc_id", chunk_or_doc.get("id")), **{
        k: chunk_or_doc.get(k) for k in ("title", "category", "timestamp", "payload")}}
    out = filter_fields(doc)
    if h is not None:
        out[HASH_KEY] = h
    return out


def doc_of(chunk_id: str) -> str:
    """The document id of a chunk id ``"<doc id>#<seq>"``."""
    return chunk_id.rsplit("#", 1)[0]


class RepeatedId(EngineError):
    """Two different documents with one id in one batch: which to keep is the caller's call."""

    def __init__(self, index: int, earlier: int, doc_id: str):
        super().__init__(f"document {index} has the id {doc_id!r} of document {earlier} with other content")
        self.index, self.earlier, self.doc_id = index, earlier, doc_id


def unique_documents(docs: list[dict]) -> list[int]:
    """The indices of the documents of a batch to ingest, ``docs`` being
    ``normalize_document``'s output: a document repeated exactly (the same id,
    or no id and the same text, and the same fields) is kept once, as
    ingesting it twice would store it once; two different documents with one
    id raise ``RepeatedId`` naming both. The server's POST /v1/documents and
    ``tallow index add`` apply this one rule."""
    first: dict[str, int] = {}
    keep: list[int] = []
    for i, doc in enumerate(docs):
        j = first.setdefault(doc["id"], i)
        if j == i:
            keep.append(i)
        elif docs[j] != doc:
            raise RepeatedId(i, j, doc["id"])
    return keep
