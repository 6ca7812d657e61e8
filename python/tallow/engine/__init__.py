"""Pipelines over the models, the index and the store: ingestion, vector and
hybrid search, RAG (``Engine``), and image similarity search (``images``).
See ``engine.engine`` for the storage model and crash safety."""

from .chunking import Chunk, chunk_text
from .derived_index import DerivedIndex, IndexRebuiltWarning, model_identity
from .documents import EngineError, IngestSummary, content_hash
from .engine import Engine
from .rag import RagAnswer
from .retrieval import K_RRF, SearchResult, rrf_fuse

__all__ = ["Chunk", "DerivedIndex", "Engine", "EngineError", "IndexRebuiltWarning", "IngestSummary", "K_RRF",
           "RagAnswer", "SearchResult", "chunk_text", "content_hash", "model_identity", "rrf_fuse"]
