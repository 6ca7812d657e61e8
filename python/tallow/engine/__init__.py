"""Pipelines over the models, the index and the store: ingestion, vector and
hybrid search, RAG. See ``engine`` for the storage model and crash safety."""

from .chunking import Chunk, chunk_text
from .engine import (K_RRF, Engine, EngineError, IndexRebuiltWarning, IngestSummary, RagAnswer, SearchResult,
                     content_hash, rrf_fuse)

__all__ = ["Chunk", "Engine", "EngineError", "IndexRebuiltWarning", "IngestSummary", "K_RRF", "RagAnswer",
           "SearchResult", "chunk_text", "content_hash", "rrf_fuse"]
