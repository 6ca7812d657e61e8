"""Retrieval: the k chunks most similar to a query by vector search, or by
hybrid search (vector + BM25 over libSQL FTS5, fused by reciprocal rank
fusion), with each hit's chunk and document fields read from the store.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from ..index import filters as F
from ..index.base import MAX_K, IndexInputError, check_k
from .documents import EngineError

K_RRF = 60  # reciprocal rank fusion constant (Cormack, Clarke & Büttcher 2009)


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


def rrf_fuse(ranked_lists: Sequence[Sequence[str]], k_rrf: int = K_RRF) -> list[tuple[str, float]]:
    """Reciprocal rank fusion: score(d) = Σ_lists 1 / (k_rrf + rank(d)), ranks from 1."""
    scores: dict[str, float] = {}
    for ids in ranked_lists:
        for rank, x in enumerate(ids, start=1):
            scores[x] = scores.get(x, 0.0) + 1.0 / (k_rrf + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def check_query(query: Any, k: Any, filter: dict | None, score_threshold: Any) -> int:
    """Checks a search's arguments (before any embedding); returns k."""
    if not isinstance(query, str):
        raise EngineError(f"query must be a str, got {type(query).__name__}")
    if not query.strip():
        raise EngineError("query is empty")
    try:
        k = check_k(k)
    except IndexInputError as exc:
        raise EngineError(str(exc)) from exc
    F.parse(filter)  # FilterError (an InputError) names the bad operator or field
    if score_threshold is not None and (isinstance(score_threshold, bool) or not isinstance(
            score_threshold, (int, float)) or not math.isfinite(score_threshold)):
        raise EngineError(f"score_threshold must be a finite number, got {score_threshold!r}")
    return k


def retrieve(index, store, qvec: np.ndarray, query: str, k: int, filter: dict | None,
             score_threshold: float | None, hybrid: bool) -> list[SearchResult]:
    """Searches ``index`` with the query vector [1, dim] (and, with
    ``hybrid``, the store's BM25 index with the query text: each list 2k long,
    fused by ``rrf_fuse``) and reads the hits' chunks from the store; hits
    whose chunk is no longer in the store are dropped."""
    if not hybrid:
        hits = index.search(qvec, k, filter, score_threshold)[0]
        scored = [(str(h.id), h.score) for h in hits]
    else:
        n = min(2 * k, MAX_K)
        vec_ids = [str(h.id) for h in index.search(qvec, n, filter)[0]]
        kw_ids = [cid for cid, _ in store.fts_search(query, n, filter)]
        scored = rrf_fuse([vec_ids, kw_ids])
        if score_threshold is not None:
            scored = [(c, s) for c, s in scored if s >= score_threshold]
        scored = scored[:k]
    chunks = {c["id"]: c for c in store.get_chunks([c for c, _ in scored])}
    out = []
    for cid, score in scored:
        c = chunks.get(cid)
        if c is None:  # in the index but no longer in the store
            continue
        out.append(SearchResult(c["doc_id"], c["title"], cid, c["text"], c["start"], c["end"], float(score),
                                c["payload"], c["category"], c["timestamp"]))
    return out
